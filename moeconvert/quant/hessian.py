"""Gathering GPTQ statistics: per-expert input second moments, routed the way the model routes.

GPTQ needs, for every Linear, ``H = 2/n * sum_t x_t x_t^T`` over the calibration inputs ``x_t`` that Linear
actually sees. For experts that is the rows the router sends them, so one layer holds a stack
``H[E, in, in]``; a dense Linear is the case ``E = 1`` with every token. This module only gathers and
normalizes; solving is :mod:`moeconvert.quant.gptq`.

Determinism. Rows are buffered per expert and turned into products only in fixed-size chunks of
``chunk_size`` rows, in token order, and the chunk products are added one by one in that order. The
chunking therefore depends only on the sequence of rows each expert receives, not on how the caller
split tokens into batches, so the sums are bit-identical however the calibration set is batched (on
CPU, with a fixed thread count).

Half the products. ``x x^T`` is symmetric, so each chunk product forms only its upper block triangle:
for each band of ``SYMMETRIZE_TILE`` rows, one matmul from the band's diagonal block on, added straight
into the sums (``addmm_``, no product buffer). With 4-8 bands that is 56-62% of a full product's flops,
and it ran in 0.57-0.77 of its time on the benchmark machine (docs/PERFORMANCE.md, "Hessian sums: the
upper block triangle"). The sums' lower block triangle is never written; :meth:`finalize` reads the upper
tiles alone and writes each with its transpose, and :meth:`~HessianAccumulator.sums` copies the upper
over the lower before handing the sums out.

Precision. Each chunk product is a float32 matmul, and the running sums are float32 too, as in the
reference: an expert's first product is written straight into its sums, each later one added. Rows that
arrive in bfloat16 (a forward pass in a bf16 checkpoint's own dtype) are multiplied on the CPU's bf16
dot-product units where it has them (AVX512-BF16, AMX), with float32 accumulation and float32 results:
every product of two bf16 numbers is exact in float32, so this is the float32 product of the same values
summed in another order, at 2-4x the float32 rate (docs/PERFORMANCE.md, "Hessian products on bf16
units"). A partial chunk goes there padded with zero rows to a multiple of 64 (exact zeros added),
since oneDNN compiles a kernel per shape, at twenty times the cost of running it. Rows of any other
dtype are widened to float32 first and multiplied in float32. The sums add one product per 512 rows, so
even a dense Linear over 128 x 2048 calibration tokens adds only 512 of them; measured against float64
sums of the same products, 512 additions leave 3e-7 relative error (Frobenius) and at most 2e-5 of the
mean diagonal on any entry, 600 times below GPTQ's 1% damping, and under the float32 solve's own
rounding. Float64 sums would double the largest buffers of a layer (4.3 GB for Qwen3-30B-A3B's gate/up
experts) and need a widening pass per product; on the benchmark machine, where fresh memory costs
0.25-0.9 s per GiB to touch, that made the products 2.5-5x slower (docs/PERFORMANCE.md).
``dtype=torch.float64`` is still accepted, for reference checks: its chunk products are float64 too.

Starved experts. A router may send an expert few or no calibration tokens. ``finalize`` fills the
deficit with pseudo-tokens drawn from the layer-wide statistics (the pool of every row any expert
received), i.e. the posterior mean of the expert's second moment under a prior centred on the layer's:

    H_e = 2 * (S_e + m_e * S_all / n_all) / (n_e + m_e),   m_e = max(min_tokens - n_e, 0)

where ``S`` are sums of ``x x^T`` and ``n`` row counts (``m_e`` is at least 1 when ``n_e = 0``). An expert with at least ``min_tokens`` rows gets
exactly the reference GPTQ Hessian; below that its effective sample size is topped up to ``min_tokens``
and the prior fades continuously as its own rows arrive. Without this, a handful of rows gives a rank-
deficient Hessian on which GPTQ over-fits those rows (damping only hides the singularity). An expert with
no rows gets the layer-wide Hessian; with no rows anywhere in the layer it gets the identity, on which
GPTQ reduces to round-to-nearest. With top-k routing every token enters the pool exactly k times, so the
pooled mean is the all-token mean; for per-expert inputs (``down_proj``) it is the pool of what all experts
received, which carries the typical per-feature scale rather than a shared correlation structure.

Wide stacks. The gate/up sums of a whole layer can outgrow the layer itself: DeepSeek-V3's 256 experts of
width 7168 need 53 GB of float32 sums, against 7.5 GB for the 262,144 calibration inputs they are summed
from. :class:`ReplayedAccumulator` keeps those inputs and their routing instead, and forms the sums a few
experts at a time when they are solved, from the same rows in the same chunks: the same bits as a
:class:`HessianAccumulator`, for the memory of one chunk of experts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

SUMS_DTYPE = torch.float32  # of the running sums; see "Precision" above
CHUNK_ROWS = 512  # rows per chunk product: the unit of deterministic summation
# Tile of finalize's symmetrization, and band of rows of each chunk product ("Half the products"):
# fastest of 64-512 at 768-4096 columns on the benchmark machine, for both.
SYMMETRIZE_TILE = 256
# Partial chunks on the CPU's bf16 units are padded with zero rows to a multiple of this: oneDNN compiles
# a kernel for each new shape (20 ms a product at 2048 columns against 1 ms to run it), and the tails of
# a layer's experts would otherwise bring up to CHUNK_ROWS shapes per width ("Precision").
BF16_UNITS_ROW_MULTIPLE = 64


class HessianAccumulator:
    """Running sums of ``x x^T`` per expert for one Linear (or one stack of expert Linears).

    Args:
        in_features: input width of the Linear.
        num_experts: experts in the stack; 1 for a dense Linear.
        chunk_size: rows per product; the unit of deterministic summation.
        dtype: dtype of the running sums (float32, see the module docstring's "Precision").
        device: where the sums live; by default the device of the first input.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int = 1,
        *,
        chunk_size: int = CHUNK_ROWS,
        dtype: torch.dtype = SUMS_DTYPE,
        device: torch.device | str | None = None,
    ) -> None:
        if in_features <= 0 or num_experts <= 0 or chunk_size <= 0:
            raise ValueError("in_features, num_experts and chunk_size must be positive")
        self.in_features = in_features
        self.num_experts = num_experts
        self.chunk_size = chunk_size
        self.dtype = dtype
        self._device = None if device is None else torch.device(device)
        self._sums: Tensor | None = None
        self._written = [False] * num_experts  # whether an expert's sums hold anything yet
        self._spent = [False] * num_experts  # whether an expert's sums were finalized in place
        self._counts = [0] * num_experts
        self._pending: list[list[Tensor]] = [[] for _ in range(num_experts)]
        self._pending_rows = [0] * num_experts

    @property
    def counts(self) -> Tensor:
        """Rows received so far per expert, int64 ``[E]``."""
        return torch.tensor(self._counts, dtype=torch.int64)

    def add(self, x: Tensor, routing: Tensor | None = None) -> None:
        """Add a batch of inputs shared by all experts (gate/up projections, or a dense Linear).

        Args:
            x: ``[T, in]`` (or ``[..., in]``) inputs, in token order.
            routing: which experts each token goes to: expert indices ``[T, k]`` (int), or a boolean mask
                ``[T, E]``. ``None`` sends every token to every expert (a dense Linear, or "calibrate all
                experts").
        """
        x = _as_rows(x, self.in_features)
        if routing is None:  # every row to every expert, in order: nothing to gather
            for expert in range(self.num_experts):
                self._push(expert, x)
            return
        mask = _routing_mask(routing, x.shape[0], self.num_experts, x.device)
        for expert, rows in enumerate(routed_rows(x, mask)):
            self._push(expert, rows)

    def add_expert(self, expert: int, x: Tensor) -> None:
        """Add the rows one expert received (e.g. its own ``act(gate) * up`` for ``down_proj``)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range for {self.num_experts} experts")
        self._push(expert, _as_rows(x, self.in_features))

    def add_per_expert(self, xs: Sequence[Tensor]) -> None:
        """Add one batch of rows per expert, ``xs[e]`` of shape ``[T_e, in]`` (``T_e`` may be 0)."""
        if len(xs) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} row batches, got {len(xs)}")
        for expert, rows in enumerate(xs):
            self.add_expert(expert, rows)

    def layer_hessian(self) -> Tensor | None:
        """The layer-wide Hessian ``2 * S_all / n_all`` over every row any expert received, or None.

        Like :meth:`finalize` it sums the partial last chunks, so call it once the rows are all in.
        """
        layer_mean = self._layer_mean()
        return None if layer_mean is None else _mirror_upper(2.0 * layer_mean)

    def finalize(
        self, min_tokens: int, *, dtype: torch.dtype = torch.float32, in_place: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Normalized, well-posed Hessians for every expert.

        Args:
            min_tokens: experts with fewer rows are topped up with layer-wide pseudo-rows (module docstring).
            dtype: dtype of the returned Hessians.
            in_place: write them over the running sums (of ``dtype``) and return those: no new memory (2.1
                GB for Qwen3-30B-A3B's gate/up experts, fresh pages that cost more to touch than the
                normalization itself). The sums are spent: this accumulator gives nothing more.

        Returns:
            ``(H, counts)``: symmetric ``H[E, in, in]`` without NaN, and the true row counts int64 ``[E]``.
        """
        return self.finalize_with(min_tokens, self._layer_mean(), dtype=dtype, in_place=in_place)

    def sums(self, *, upper_only: bool = False) -> Tensor:
        """The running sums ``S_e`` ``[E, in, in]`` with every buffered row included (once all rows are in).

        Their lower block triangle is first copied from the upper one (module docstring, "Half the
        products"); with ``upper_only`` it is left as it is, meaningless, for a caller that only hands the
        sums to :meth:`finalize_with` as a ``layer_mean`` (which reads the upper tiles alone)."""
        self._flush_all()
        self._check_unspent(range(self.num_experts))
        sums = self._sums_or_zeros()
        if not upper_only:
            for expert in range(self.num_experts):
                _mirror_upper(sums[expert])
        return sums

    def iter_sums(self, *, upper_only: bool = False) -> Iterator[Tensor]:
        """Each expert's running sums ``S_e`` in expert order (see :class:`ReplayedAccumulator`)."""
        return iter(self.sums(upper_only=upper_only))

    def finalize_with(
        self,
        min_tokens: int,
        layer_mean: Tensor | None,
        *,
        dtype: torch.dtype = torch.float32,
        experts: range | None = None,
        out: Tensor | None = None,
        in_place: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`finalize` with the layer-wide ``S_all / n_all`` given: for an accumulator that holds only
        some of a layer's experts (expert-parallel runs sum it across ranks, in expert order). With
        ``experts`` (a range with step 1), only those Hessians are returned, so a caller solving a few
        experts at a time holds one chunk of them (Mixtral-8x7B's eight 14336² down Hessians are 6.6 GB
        in float32); ``out`` (``[len(experts), in, in]`` of ``dtype``) takes them, or with ``in_place``
        those experts' own sums do (they are spent, see :meth:`finalize`)."""
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        self._flush_all()
        sums = self._sums_or_zeros()
        experts = range(self.num_experts) if experts is None else experts
        self._check_unspent(experts)
        shape = (len(experts), *sums.shape[1:])
        if in_place:
            if out is not None or experts.step != 1 or dtype != sums.dtype:
                raise ValueError(f"in_place needs no out, a range of step 1 and dtype {sums.dtype}")
            out = sums[experts.start : experts.stop]
            for expert in experts:
                self._spent[expert] = True
        hessians = torch.empty(shape, dtype=dtype, device=sums.device) if out is None else out
        if hessians.shape != shape or hessians.dtype != dtype:
            raise ValueError(
                f"out must be {dtype} {list(shape)}, got {hessians.dtype} {list(hessians.shape)}"
            )
        tile = min(SYMMETRIZE_TILE, self.in_features)
        scratch = torch.empty(2, tile, tile, dtype=sums.dtype, device=sums.device)
        for slot, expert in enumerate(experts):
            rows = self._counts[expert]
            pseudo_rows = _pseudo_rows(rows, min_tokens) if layer_mean is not None else 0
            if rows + pseudo_rows == 0:  # no data anywhere in the layer
                hessians[slot] = torch.eye(self.in_features, dtype=dtype, device=sums.device)
                continue
            _normalize(sums[expert], layer_mean, pseudo_rows, rows, out=hessians[slot], scratch=scratch)
        return hessians, self.counts

    # -- internals -------------------------------------------------------------------------------------

    def _push(self, expert: int, rows: Tensor) -> None:
        """Buffer an expert's rows; turn every full chunk into a product, in arrival order.

        Rows left waiting are held as a copy of their own, fewer than a chunk: they are often a view of
        something larger (one gather of a batch's routed rows serves every expert, a dense Linear's rows
        are its input), which would stay alive with them, and an expert that receives a few rows per
        batch would keep every batch of the calibration set (Qwen3-30B-A3B: 512 MB each, 32 batches at
        128 x 2048 tokens)."""
        if rows.shape[0] == 0:
            return
        self._check_unspent(range(expert, expert + 1))
        self._counts[expert] += rows.shape[0]
        self._pending[expert].append(rows)
        self._pending_rows[expert] += rows.shape[0]
        if self._pending_rows[expert] >= self.chunk_size:
            self._flush(expert, whole_chunks_only=True)
        else:
            self._pending[expert][-1] = rows.clone()

    def _flush(self, expert: int, whole_chunks_only: bool) -> None:
        if self._pending_rows[expert] == 0:
            return
        pending = self._pending[expert]
        rows = pending[0] if len(pending) == 1 else torch.cat(pending)  # one piece: no copy of it
        full = rows.shape[0] - rows.shape[0] % self.chunk_size if whole_chunks_only else rows.shape[0]
        for start in range(0, full, self.chunk_size):
            self._add_product(expert, rows[start : start + self.chunk_size])
        rest = rows[full:].clone()
        self._pending[expert] = [rest] if rest.shape[0] else []
        self._pending_rows[expert] = rest.shape[0]

    def _flush_all(self) -> None:
        """Sum the partial last chunks, and zero the sums of experts without rows. Later rows start new
        chunks, so finalize once, at the end."""
        for expert in range(self.num_experts):
            self._flush(expert, whole_chunks_only=False)
        for expert, written in enumerate(self._written):
            if not written:
                self._sums_or_zeros()[expert].zero_()
                self._written[expert] = True

    def _add_product(self, expert: int, chunk: Tensor) -> None:
        """``S_e += x^T x`` for one chunk, on the sums' upper block triangle ("Half the products"), in the
        sums' dtype (on bf16 units for bf16 rows, "Precision"). An expert's first product is written
        straight into its sums (they are not zeroed first: fresh memory touched twice costs more than the
        product), later ones added to them."""
        sums = self._sums_or_zeros(chunk.device)
        on_bf16_units = _exact_on_bf16_units(chunk, sums)  # asked before the rows are widened
        if on_bf16_units:
            chunk = _padded_rows(chunk, BF16_UNITS_ROW_MULTIPLE)
        chunk = chunk.to(device=sums.device, dtype=sums.dtype)
        with _float32_matmuls_on_bf16_units() if on_bf16_units else nullcontext():
            _add_upper_product(sums[expert], chunk, overwrite=not self._written[expert])
        self._written[expert] = True

    def _sums_or_zeros(self, device: torch.device | None = None) -> Tensor:
        """The running sums ``[E, in, in]``, allocated on first use but not zeroed: an expert's are
        written by its first product, or zeroed by :meth:`_flush_all` if it has none, so each page is
        touched once (a layer's sums are GBs, and first touches cost more than the products)."""
        if self._sums is None:
            where = self._device or device or torch.device("cpu")
            shape = (self.num_experts, self.in_features, self.in_features)
            self._sums = torch.empty(shape, dtype=self.dtype, device=where)
        return self._sums

    def _layer_mean(self) -> Tensor | None:
        """``S_all / n_all`` with ``S_all = sum_e S_e`` added in expert order; None without any rows."""
        self._flush_all()
        total = sum(self._counts)
        if total == 0:
            return None
        self._check_unspent(range(self.num_experts))
        sums = self._sums_or_zeros()
        pooled = sums[0].clone()
        for expert in range(1, self.num_experts):
            pooled += sums[expert]
        return pooled / total

    def _check_unspent(self, experts: range) -> None:
        spent = [e for e in experts if self._spent[e]]
        if spent:
            raise RuntimeError(f"the sums of experts {spent} were finalized in place; they are gone")


class ReplayedAccumulator:
    """A :class:`HessianAccumulator` for inputs shared by a stack of experts (their gate and up
    projections) that keeps the inputs instead of the sums (module docstring, "Wide stacks").

    Each batch's rows and routing are kept as they come; the sums of a range of experts are formed when
    asked for, by replaying every batch in order into a :class:`HessianAccumulator` of just those
    experts. An expert's sums depend only on the sequence of rows it receives, so they are bit-identical
    to those of one accumulator fed as the batches came. Rows are kept in the dtype they arrive in and
    replayed in it (a bf16 forward pass keeps half the bytes).
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        chunk_size: int = CHUNK_ROWS,
        dtype: torch.dtype = SUMS_DTYPE,
        experts_per_replay: int = 1,
    ) -> None:
        self.in_features, self.num_experts, self.dtype = in_features, num_experts, dtype
        self.chunk_size = chunk_size
        self.experts_per_replay = max(1, experts_per_replay)  # experts summed at once by :meth:`iter_sums`
        self._batches: list[tuple[Tensor, Tensor]] = []  # (rows [T, in], routing mask [T, E])
        self._counts = torch.zeros(num_experts, dtype=torch.int64)

    @property
    def counts(self) -> Tensor:
        """Rows received so far per expert, int64 ``[E]``."""
        return self._counts.clone()

    @property
    def stored_bytes(self) -> int:
        """Memory the kept rows and routing masks take."""
        return sum(x.nbytes + mask.nbytes for x, mask in self._batches)

    def add(self, x: Tensor, routing: Tensor | None = None) -> None:
        """As :meth:`HessianAccumulator.add`: keep a batch of inputs and which experts each row goes to."""
        x = _as_rows(x, self.in_features)
        mask = _routing_mask(routing, x.shape[0], self.num_experts, x.device)
        self._batches.append((x, mask))
        self._counts += mask.sum(dim=0).cpu()

    def accumulator(self, experts: range) -> HessianAccumulator:
        """A :class:`HessianAccumulator` of ``experts`` alone, fed every kept batch in order."""
        acc = HessianAccumulator(self.in_features, len(experts), chunk_size=self.chunk_size, dtype=self.dtype)
        for x, mask in self._batches:
            acc.add(x, mask[:, experts.start : experts.stop])
        return acc

    def iter_sums(self, *, upper_only: bool = False) -> Iterator[Tensor]:
        """Each expert's sums ``S_e`` in expert order, ``experts_per_replay`` experts' sums held at a time
        (``upper_only`` as in :meth:`HessianAccumulator.sums`)."""
        for start in range(0, self.num_experts, self.experts_per_replay):
            experts = range(start, min(start + self.experts_per_replay, self.num_experts))
            yield from self.accumulator(experts).sums(upper_only=upper_only)

    def finalize_with(
        self,
        min_tokens: int,
        layer_mean: Tensor | None,
        *,
        dtype: torch.dtype = torch.float32,
        experts: range | None = None,
        out: Tensor | None = None,
        in_place: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """As :meth:`HessianAccumulator.finalize_with`; the sums of ``experts`` are formed here (and with
        ``in_place`` become the Hessians; the kept inputs stay, so they can be formed again)."""
        experts = range(self.num_experts) if experts is None else experts
        hessians, _ = self.accumulator(experts).finalize_with(
            min_tokens, layer_mean, dtype=dtype, out=out, in_place=in_place
        )
        return hessians, self.counts


def _as_rows(x: Tensor, in_features: int) -> Tensor:
    """``x`` as ``[T, in]`` rows, checked to have ``in_features`` features."""
    if x.shape[-1] != in_features:
        raise ValueError(f"expected inputs with {in_features} features, got shape {tuple(x.shape)}")
    return x.reshape(-1, in_features)


def routed_rows(x: Tensor, mask: Tensor) -> list[Tensor]:
    """The rows of ``x [T, in]`` that each expert receives under ``mask [T, E]``, in token order: views
    of one gather, sorted by expert."""
    pairs = mask.t().nonzero()  # (expert, token), sorted by expert then token
    per_expert = torch.bincount(pairs[:, 0], minlength=mask.shape[1]).tolist()
    return list(x.index_select(0, pairs[:, 1]).split(per_expert))


def _routing_mask(routing: Tensor | None, tokens: int, num_experts: int, device: torch.device) -> Tensor:
    """Boolean ``[T, E]``: token t goes to expert e."""
    if routing is None:
        return torch.ones(tokens, num_experts, dtype=torch.bool, device=device)
    routing = routing.to(device)
    if routing.dtype == torch.bool:
        mask = routing.reshape(-1, routing.shape[-1])
        if mask.shape != (tokens, num_experts):
            raise ValueError(f"routing mask must be [{tokens}, {num_experts}], got {tuple(mask.shape)}")
        return mask
    if routing.is_floating_point() or routing.is_complex():
        raise ValueError("routing must be integer expert indices [T, k] or a boolean mask [T, E]")
    index = routing.reshape(-1, routing.shape[-1]).long()
    if index.shape[0] != tokens:
        raise ValueError(f"routing has {index.shape[0]} rows for {tokens} tokens")
    if index.numel() and (index.min() < 0 or index.max() >= num_experts):
        raise ValueError(f"expert indices must be in [0, {num_experts})")
    mask = torch.zeros(tokens, num_experts, dtype=torch.bool, device=device)
    return mask.scatter_(1, index, True)


def _exact_on_bf16_units(rows: Tensor, sums: Tensor) -> bool:
    """Whether ``rows``' products into ``sums`` may run on the CPU's bf16 units and lose nothing: bf16
    rows (exact in bf16 by construction), float32 sums on a CPU that has the units."""
    return (
        rows.dtype == torch.bfloat16
        and sums.dtype == torch.float32
        and sums.device.type == "cpu"
        and cpu_has_bf16_units()
    )


def rows_for_bf16_units(rows: Tensor) -> Tensor:
    """``rows`` as a matmul on the CPU's bf16 units takes them best: bf16 rows on a CPU that has the units
    padded with zero rows to a multiple of ``BF16_UNITS_ROW_MULTIPLE`` (oneDNN compiles a kernel for each
    new shape, and routed experts receive every row count), other rows as they are. The caller keeps the
    first ``rows.shape[0]`` rows of the product."""
    if rows.dtype != torch.bfloat16 or rows.device.type != "cpu" or not cpu_has_bf16_units():
        return rows
    return _padded_rows(rows, BF16_UNITS_ROW_MULTIPLE)


def _padded_rows(rows: Tensor, multiple: int) -> Tensor:
    """``rows`` with zero rows appended up to a multiple of ``multiple``: they add exact zeros to
    ``x^T x``, and the product's shape comes from a small set."""
    missing = -rows.shape[0] % multiple
    if missing == 0:
        return rows
    return torch.cat([rows, rows.new_zeros(missing, rows.shape[1])])


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX) and torch reaches it through
    oneDNN. Without the units oneDNN would emulate bf16, slower than a float32 matmul."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    units = any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return units and torch.backends.mkldnn.is_available()


@contextmanager
def _float32_matmuls_on_bf16_units() -> Iterator[None]:
    """Float32 matmuls on the CPU take their inputs as bf16 and accumulate in float32 meanwhile: exact for
    inputs that are bf16 values. The setting is process-wide; it is restored on the way out."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _add_upper_product(out: Tensor, x: Tensor, *, overwrite: bool) -> None:
    """``out += x^T x`` (``out = x^T x`` with ``overwrite``) on ``out``'s upper block triangle: each band of
    ``SYMMETRIZE_TILE`` rows from its diagonal block on, one matmul per band; the rest of ``out`` is not
    touched. With ``beta=0`` a matmul ignores what ``out`` held, NaN included."""
    columns = x.shape[1]
    for start in range(0, columns, SYMMETRIZE_TILE):
        stop = min(start + SYMMETRIZE_TILE, columns)
        out[start:stop, start:].addmm_(x[:, start:stop].mT, x[:, start:], beta=0 if overwrite else 1)


def _mirror_upper(matrix: Tensor) -> Tensor:
    """Copy ``matrix``'s upper block triangle (tiles of ``SYMMETRIZE_TILE``) over its lower one, in place;
    the diagonal tiles stay as they are. Returns ``matrix``."""
    columns = matrix.shape[0]
    for i in range(0, columns, SYMMETRIZE_TILE):
        for j in range(i + SYMMETRIZE_TILE, columns, SYMMETRIZE_TILE):
            band, other = slice(i, i + SYMMETRIZE_TILE), slice(j, j + SYMMETRIZE_TILE)
            matrix[other, band] = matrix[band, other].mT
    return matrix


def _normalize(
    sums: Tensor, layer_mean: Tensor | None, pseudo_rows: int, rows: int, *, out: Tensor, scratch: Tensor
) -> None:
    """``out = sym(2 * (S_e + m_e * S_all / n_all) / (n_e + m_e))`` from the upper block triangle of the
    sums and of ``layer_mean`` (module docstring, "Half the products"): exactly symmetric, whatever the
    matmuls did.

    ``sym`` takes each tile above the diagonal as it is, written to ``out`` at the tile and, transposed,
    at its mirror, and a diagonal tile ``d`` as ``(d + d^T) / 2``. One tile at a time, scaled in
    ``scratch`` (two tiles of the sums' dtype, in cache): one read of half the sums and one write of
    ``out``, with no ``in x in`` buffer (a whole-matrix pass through one moved about four times the
    bytes: 20-35% slower for an expert without pseudo-rows, docs/PERFORMANCE.md).
    """
    scale = 2.0 / (rows + pseudo_rows)
    n, size = sums.shape[0], SYMMETRIZE_TILE
    for i in range(0, n, size):
        for j in range(i, n, size):
            tile = _scaled_tile(sums, layer_mean, pseudo_rows, scale, (i, j), scratch[0])
            if i == j:
                tile = torch.add(tile, tile.mT, out=scratch[1, : tile.shape[0], : tile.shape[1]]).mul_(0.5)
            out[i : i + size, j : j + size] = tile
            if i != j:
                out[j : j + size, i : i + size] = tile.mT


def _scaled_tile(
    sums: Tensor,
    layer_mean: Tensor | None,
    pseudo_rows: int,
    scale: float,
    at: tuple[int, int],
    buffer: Tensor,
) -> Tensor:
    """``(S_e + m_e * S_all / n_all) * scale`` of the tile at ``at`` (rows, columns), in ``buffer``."""
    rows = slice(at[0], at[0] + SYMMETRIZE_TILE)
    columns = slice(at[1], at[1] + SYMMETRIZE_TILE)
    block = sums[rows, columns]
    tile = buffer[: block.shape[0], : block.shape[1]]
    if pseudo_rows:
        torch.mul(layer_mean[rows, columns], pseudo_rows, out=tile).add_(block)
    else:
        tile.copy_(block)
    return tile.mul_(scale)


def _pseudo_rows(rows: int, min_tokens: int) -> int:
    """Layer-wide pseudo-rows ``m_e`` that top an expert up to ``min_tokens``; one if it has no rows."""
    return max(min_tokens - rows, 0 if rows else 1)
