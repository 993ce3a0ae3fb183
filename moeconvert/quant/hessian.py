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

Precision. Each chunk product is a float32 matmul, and the running sums are float32 too, as in the
reference: an expert's first product is written straight into its sums, each later one added. The sums
add one product per 512 rows, so even a dense Linear over 128 x 2048 calibration tokens adds only 512
of them; measured against float64 sums of the same products, 512 additions leave 3e-7 relative error
(Frobenius) and at most 2e-5 of the mean diagonal on any entry, 600 times below GPTQ's 1% damping, and
under the float32 solve's own rounding. Float64 sums would double the largest buffers of a layer (4.3 GB
for Qwen3-30B-A3B's gate/up experts) and need a widening pass per product; on the benchmark machine,
where fresh memory costs 0.25-0.9 s per GiB to touch, that made the products 2.5-5x slower
(docs/PERFORMANCE.md). ``dtype=torch.float64`` is still accepted, for reference checks.

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

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

SUMS_DTYPE = torch.float32  # of the running sums; see "Precision" above
CHUNK_ROWS = 512  # rows per chunk product: the unit of deterministic summation
SYMMETRIZE_TILE = 256  # fastest of 64-512 at 768-4096 columns on the benchmark machine


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
        self._product: tuple[Tensor, Tensor] | None = None  # float32 and widened x^T x, see _add_product
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
        mask = _routing_mask(routing, x.shape[0], self.num_experts, x.device)
        pairs = mask.t().nonzero()  # (expert, token), sorted by expert then token
        per_expert = torch.bincount(pairs[:, 0], minlength=self.num_experts).tolist()
        gathered = x.index_select(0, pairs[:, 1])
        for expert, rows in enumerate(gathered.split(per_expert)):
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
        return None if layer_mean is None else 2.0 * layer_mean

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

    def sums(self) -> Tensor:
        """The running sums ``S_e`` ``[E, in, in]`` with every buffered row included (once all rows are in)."""
        self._flush_all()
        self._check_unspent(range(self.num_experts))
        return self._sums_or_zeros()

    def iter_sums(self) -> Iterator[Tensor]:
        """Each expert's running sums ``S_e`` in expert order (see :class:`ReplayedAccumulator`)."""
        return iter(self.sums())

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
        scratch = torch.empty(3, tile, tile, dtype=sums.dtype, device=sums.device)
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
        """Buffer an expert's rows; turn every full chunk into a product, in arrival order."""
        if rows.shape[0] == 0:
            return
        self._check_unspent(range(expert, expert + 1))
        self._counts[expert] += rows.shape[0]
        self._pending[expert].append(rows)
        self._pending_rows[expert] += rows.shape[0]
        if self._pending_rows[expert] >= self.chunk_size:
            self._flush(expert, whole_chunks_only=True)

    def _flush(self, expert: int, whole_chunks_only: bool) -> None:
        if self._pending_rows[expert] == 0:
            return
        rows = torch.cat(self._pending[expert])
        full = rows.shape[0] - rows.shape[0] % self.chunk_size if whole_chunks_only else rows.shape[0]
        for start in range(0, full, self.chunk_size):
            self._add_product(expert, rows[start : start + self.chunk_size])
        rest = rows[full:].clone()
        self._pending[expert] = [rest] if rest.shape[0] else []
        self._pending_rows[expert] = rest.shape[0]

    def _flush_all(self) -> None:
        """Sum the partial last chunks, and zero the sums of experts without rows. Later rows start new
        chunks, so finalize once, at the end. The product buffers go too (at Mixtral-8x7B's down width
        they are 0.8 GB); later rows would allocate them again."""
        for expert in range(self.num_experts):
            self._flush(expert, whole_chunks_only=False)
        self._product = None
        for expert, written in enumerate(self._written):
            if not written:
                self._sums_or_zeros()[expert].zero_()
                self._written[expert] = True

    def _add_product(self, expert: int, chunk: Tensor) -> None:
        """``S_e += x^T x`` for one chunk, a float32 product. An expert's first product is written
        straight into its float32 sums; later ones go through a product buffer kept for the
        accumulator's life (and, for float64 sums, a widening one): fresh ``in x in`` temporaries per
        product cost more in page faults than the product itself, and the buffers change no bit of the
        sum."""
        sums = self._sums_or_zeros(chunk.device)
        chunk = chunk.to(device=sums.device, dtype=torch.float32)
        if not self._written[expert] and sums.dtype == torch.float32:
            torch.mm(chunk.t(), chunk, out=sums[expert])
            self._written[expert] = True
            return
        if self._product is None:
            product = torch.empty(sums.shape[1:], dtype=torch.float32, device=sums.device)
            self._product = (product, product if sums.dtype == torch.float32 else torch.empty_like(sums[0]))
        product, widened = self._product
        torch.mm(chunk.t(), chunk, out=product)
        if self._written[expert]:
            sums[expert] += widened.copy_(product)
        else:  # float64 sums: the first product copied in, widened on the way, one pass instead of two
            sums[expert].copy_(product)
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
    widened to float32 as they are replayed (a bf16 forward pass keeps half the bytes).
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
            acc.add(x.float(), mask[:, experts.start : experts.stop])
        return acc

    def iter_sums(self) -> Iterator[Tensor]:
        """Each expert's sums ``S_e`` in expert order, ``experts_per_replay`` experts' sums held at a time."""
        for start in range(0, self.num_experts, self.experts_per_replay):
            experts = range(start, min(start + self.experts_per_replay, self.num_experts))
            yield from self.accumulator(experts).sums()

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


def _normalize(
    sums: Tensor, layer_mean: Tensor | None, pseudo_rows: int, rows: int, *, out: Tensor, scratch: Tensor
) -> None:
    """``out = sym(2 * (S_e + m_e * S_all / n_all) / (n_e + m_e))``, ``sym(h) = (h + h^T) / 2``: exactly
    symmetric, whatever the matmul did.

    One pass over a pair of mirrored square tiles at a time: both are scaled in ``scratch`` (three
    tiles of the sums' dtype, in cache), their half sum is written to ``out`` at the tile and,
    transposed, at its mirror. The same operations in the same order per element as the plain
    expression, so the same bits (``a + b == b + a`` and ``x * 0.5 == x / 2`` exactly), for one read of
    the sums and one write of ``out``, with no ``in x in`` buffer (a whole-matrix pass through one moved
    about four times the bytes: 20-35% slower for an expert without pseudo-rows, docs/PERFORMANCE.md).
    """
    scale = 2.0 / (rows + pseudo_rows)
    n, size = sums.shape[0], SYMMETRIZE_TILE
    for i in range(0, n, size):
        for j in range(i, n, size):
            tile = _scaled_tile(sums, layer_mean, pseudo_rows, scale, (i, j), scratch[0])
            mirror = (
                tile if i == j else _scaled_tile(sums, layer_mean, pseudo_rows, scale, (j, i), scratch[1])
            )
            half_sum = torch.add(tile, mirror.mT, out=scratch[2, : tile.shape[0], : tile.shape[1]]).mul_(0.5)
            out[i : i + size, j : j + size] = half_sum
            if i != j:
                out[j : j + size, i : i + size] = half_sum.mT


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
