"""Forward passes one decoder layer at a time, with transformers' own modules.

The model skeleton is built on the "meta" device (no memory). Its embeddings are materialised, and
*recorders* in place of the decoder layers record exactly what the model hands each of them (mask,
positions, rotary embeddings), whatever the family: models that mix sliding-window and full attention
hand each kind of layer its own mask. Each layer is then materialised from its tensors, run on the
hidden states, and returned to "meta", so only one layer's weights are resident at a time.

Most families' decoder layers are ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))`` (LFM2's with a
short convolution in place of attention in most layers), or with norms on both sides (Trinity's):
``h = x + norm1b(attn(norm1(x))); out = h + norm2b(mlp(norm2(h)))``. A
pass that has already run a layer's attention on some input can keep ``h`` (:meth:`LayerwiseModel.
capture_residual`) and later finish the layer from it (:meth:`LayerwiseModel.run_mlp_half`), with the
same operations in the same order: quantize's second pass over a layer whose attention it leaves as it
is computes that attention once, not twice.

Some layers hand the next one more than hidden states: GLM-5's sparse-attention layers return the
tokens their indexer picked, and its "shared" layers attend to the picks of the layer before instead of
running an indexer of their own. Such state rides on the hidden states it belongs to (:func:`carried`),
through every pass, spill and resume record, since it is as much a part of a batch's stream as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .checkpoint import layer_index, text_model_name

# The keyword under which a decoder layer takes the previous layer's picks of tokens (GLM-5's); such a
# layer returns its own picks as a second output.
CARRIED_KWARG = "prev_topk_indices"
_CARRIED_ATTRIBUTE = "moeconvert_carried"


def carried(hidden: torch.Tensor) -> torch.Tensor | None:
    """The state the layer that computed ``hidden`` hands the next one with it (None where there is none)."""
    return getattr(hidden, _CARRIED_ATTRIBUTE, None)


def with_carried(hidden: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """``hidden``, carrying ``state`` to the next layer (an attribute of this tensor object: operations on
    it make tensors without it, so only what a layer returns, or a record restores, carries it)."""
    if state is not None:
        setattr(hidden, _CARRIED_ATTRIBUTE, state)
    return hidden


class _Caught(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records what the model hands it and passes the hidden states on
    unchanged (with nothing carried, where the model expects a layer to return that too); the last
    layer's recorder stops the forward pass. Arguments handed by position after the hidden states
    (Gemma 4's ``per_layer_input``) are recorded under the layer's own names for them; the layer's plain
    attributes, which the model may read to pick what to hand it (Nemotron-H's ``block_type``), are
    the recorder's too."""

    def __init__(self, into: list[dict[str, Any]], last: bool, layer: nn.Module) -> None:
        super().__init__()
        for name, value in vars(layer).items():
            if not name.startswith("_") and isinstance(value, (str, int, float, bool)):
                setattr(self, name, value)
        self.into, self.last = into, last
        self.names = list(inspect.signature(layer.forward).parameters)[1:]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.into.append({**dict(zip(self.names, args, strict=False)), **kwargs})
        if self.last:
            raise _Caught
        return (hidden_states, None) if CARRIED_KWARG in kwargs else hidden_states


def _materialise(
    module: nn.Module, state: dict[str, torch.Tensor], device: torch.device, unread: Collection[str] = ()
) -> None:
    """Give a meta module real storage from ``state``; non-persistent buffers are recomputed by caller.
    Names in ``unread`` keep the uninitialised storage they get here (on a CPU, memory never touched)."""
    module.to_empty(device=device)
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if unexpected or [m for m in missing if m not in unread and not _is_nonpersistent(module, m)]:
        raise RuntimeError(
            f"layer weights do not fit the model definition: missing {missing}, unexpected {unexpected}"
        )


def _is_nonpersistent(module: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return leaf in owner._non_persistent_buffers_set


def experts_implementation(device: torch.device) -> str:
    """transformers' implementation of routed experts for a forward pass on ``device``.

    Its default, ``grouped_mm``, is one kernel for all experts on a GPU; on a CPU that kernel is slower
    than ``eager``, one matmul per expert that has tokens, which runs at the machine's matmul rate
    (1.1-2x faster per MoE block at Qwen3-30B-A3B's and smaller widths, float32 and bf16, measured with
    transformers 5.24 and torch 2.13; docs/PERFORMANCE.md).
    """
    return "eager" if device.type == "cpu" else "grouped_mm"


def on_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device``, a floating tensor converted to ``dtype`` (others keep theirs), with the
    narrower of the two dtypes on the bus.

    torch converts a host-to-GPU copy that also changes the dtype on the host, before the transfer:
    ``t.to("cuda", torch.float32)`` of a bf16 layer widens it with the CPU and sends twice its bytes.
    Moved first, the layer crosses in bf16 and the GPU widens it. On a CPU this is the one conversion
    it always was, with the same bits.
    """
    if not t.is_floating_point() or t.dtype == dtype:
        return t.to(device)
    if dtype.itemsize > t.dtype.itemsize:
        return t.to(device).to(dtype)
    return t.to(dtype).to(device)


# The names families give the same parts, in the order looked for: the MLP block (LFM2-MoE's is
# feed_forward); the norm before it (post_attention_layernorm, but Trinity's normalizes the attention's
# output and pre_mlp_layernorm the MLP's input; LFM2's is ffn_norm); the model's final norm and rotary
# embedding (LFM2's embedding_norm and pos_emb; Jamba's final_layernorm, and no rotary embedding;
# Nemotron-H's norm_f).
MLP_NAMES = ("mlp", "feed_forward")
_MLP_NORM_NAMES = ("pre_mlp_layernorm", "post_attention_layernorm", "ffn_norm")
_FINAL_NORM_NAMES = ("norm", "embedding_norm", "final_layernorm", "norm_f")
_EMBEDDING_NAMES = ("embed_tokens", "embeddings")  # Nemotron-H's is embeddings
_ROTARY_NAMES = ("rotary_emb", "pos_emb")


def _first(module: nn.Module, names: tuple[str, ...]) -> Any:
    """``module``'s attribute under the first of ``names`` it has, or None."""
    return next((getattr(module, name) for name in names if hasattr(module, name)), None)


def _mlp_norm(layer: nn.Module) -> nn.Module:
    """The norm a decoder layer applies to its residual stream before the MLP."""
    return _first(layer, _MLP_NORM_NAMES)


# CPU kernels take other (equally valid) code paths for data that is not cache-line aligned, which moves
# results by an ulp: safetensors hands out tensors at their file offsets, 8-byte aligned
ALIGNMENT = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a fresh copy where its data is not ``ALIGNMENT``-aligned in host memory: a layer must
    compute the same whichever file, offset or layout its weights came from (a lossless conversion gives
    equal logits)."""
    return t.clone() if t.device.type == "cpu" and t.data_ptr() % ALIGNMENT else t


class TextCausalLM(nn.Module):
    """A text model and a head, laid out as transformers' causal LMs are (``model.*``, ``lm_head``), for a
    text model that transformers only ships inside a vision-language one (GLM-4.5V's)."""

    def __init__(self, config: Any) -> None:
        from transformers import AutoModel

        super().__init__()
        self.config = config
        self.model = AutoModel.from_config(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)


def text_causal_lm(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """transformers' causal LM for a text model's ``config``, or :class:`TextCausalLM` where transformers
    has none; built on the current default device (``meta`` for shapes alone)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))
    except ValueError:  # "Unrecognized configuration class": no causal LM registered for it
        model = TextCausalLM(config)
        return model if dtype is None else model.to(dtype)


def _with_attention(config: Any, dtype: torch.dtype) -> nn.Module:
    """:func:`text_causal_lm` with PyTorch's fused attention (``sdpa``), or the plain one where the model
    computes something sdpa cannot (MiMo-V2-Flash's attention sinks): what transformers picks by default."""
    config._attn_implementation = "sdpa"
    try:
        return text_causal_lm(config, dtype)
    except ValueError as err:
        if "scaled_dot_product_attention" not in str(err):
            raise
    config._attn_implementation = "eager"
    return text_causal_lm(config, dtype)


def _per_base_rotary_on(backbone: nn.Module, device: torch.device) -> None:
    """Build on ``device`` the rotary embeddings a model keeps in a list, one per distinct base where its
    layers' bases differ (Granite SWA's ``rotary_embs``): their tables are computed from each one's
    own config, never stored, so they cannot stay on meta like the weights."""
    for rotaries in (
        m for m in backbone.children() if isinstance(m, nn.ModuleList) and m is not backbone.layers
    ):
        for i, rotary in enumerate(rotaries):
            if isinstance(getattr(rotary, "inv_freq", None), torch.Tensor) and rotary.inv_freq.is_meta:
                with torch.device(device):
                    rotaries[i] = type(rotary)(config=rotary.config)


def _scale_of_embedding_on(module: nn.Module, device: torch.device) -> None:
    """Set the factor an embedding that scales its output keeps as a non-persistent buffer (Gemma's
    ``embed_scale``, from its ``scalar_embed_scale``): never stored, so not in the materialised state."""
    scale = getattr(module, "scalar_embed_scale", None)
    if scale is not None and isinstance(getattr(module, "embed_scale", None), torch.Tensor):
        module.embed_scale = torch.tensor(scale, device=device)


def turned_stacks(config: Any) -> set[str]:
    """In-layer names of the expert stacks that the family's module holds transposed (Llama 4's): the
    layers are handed [E, 2I, H] and [E, H, I] stacks, as every command keeps them, and give the module
    views of their transpose."""
    from .families import FAMILIES

    family = FAMILIES.get(getattr(config, "model_type", None))
    return set(family.fused_stacks) if family is not None and family.runtime_transposed else set()


class LayerwiseModel:
    """A causal LM whose layers are loaded on demand.

    ``config`` is a transformers config object; tensors handed to :meth:`load_layer` and
    :meth:`load_top` use transformers 5 runtime names (fused experts).
    """

    def __init__(
        self, config: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        config._experts_implementation = experts_implementation(self.device)
        with torch.device("meta"):
            self.model = _with_attention(config, dtype)
        self.model.eval()
        self.config = config
        self.backbone = self.model.model
        # none, or None: no positions in attention (Jamba's, Granite 4.0-H's)
        rotary = next(
            (name for name in _ROTARY_NAMES if getattr(self.backbone, name, None) is not None), None
        )
        if rotary is not None:
            with torch.device(self.device):
                setattr(self.backbone, rotary, type(getattr(self.backbone, rotary))(config=config))
        _per_base_rotary_on(self.backbone, self.device)
        final_norm = next(name for name in _FINAL_NORM_NAMES if hasattr(self.backbone, name))
        self.final_norm = getattr(self.backbone, final_norm)
        self._embedding = next(name for name in _EMBEDDING_NAMES if hasattr(self.backbone, name))
        self._top_modules = (f"model.{self._embedding}", f"model.{final_norm}", "lm_head")
        self._kwargs: dict[tuple[int, ...], list[dict[str, Any]]] = {}  # per input shape, per layer
        self._turned = turned_stacks(config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def load_top(self, tensors: dict[str, torch.Tensor]) -> None:
        """Embeddings, final norm and head: names as in the checkpoint (``model.embed_tokens.weight``, or
        a vision-language checkpoint's ``model.language_model.embed_tokens.weight``...); other tensors
        are not read."""
        top = {text_model_name(n): t for n, t in tensors.items() if layer_index(n) is None}
        if "lm_head.weight" not in top and getattr(self.config, "tie_word_embeddings", False):
            top["lm_head.weight"] = top[f"model.{self._embedding}.weight"]
        for module_name in self._top_modules:
            module = self.model.get_submodule(module_name)
            prefix = module_name + "."
            state = {
                n[len(prefix) :]: aligned(on_device(t, self.device, self.dtype))
                for n, t in top.items()
                if n.startswith(prefix)
            }
            _materialise(module, state, self.device)
            _scale_of_embedding_on(module, self.device)

    def release_top(self) -> None:
        """Back to meta for embeddings, final norm and head, once a pass needs no more of them (a
        quantize pass embeds its calibration tokens once; Mixtral's two float32 tables are 1 GB)."""
        for module_name in self._top_modules:
            self.model.get_submodule(module_name).to("meta")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first layer's input: the embeddings, scaled where the model scales them (Granite's
        ``embedding_multiplier``)."""
        with torch.no_grad():
            hidden = getattr(self.backbone, self._embedding)(input_ids.to(self.device))
            scale = getattr(self.config, "embedding_multiplier", None)
            return hidden if scale in (None, 1) else hidden * scale

    def layer_kwargs(self, hidden: torch.Tensor, index: int) -> dict[str, Any]:
        """What the model passes decoder layer ``index`` for inputs of this shape (cached per shape; the
        layers of one kind share their mask and rotary tensors, so this holds one of each)."""
        key = tuple(hidden.shape)
        if key not in self._kwargs:
            recorded: list[dict[str, Any]] = []
            layers = list(self.backbone.layers)
            for i in range(len(layers)):
                self.backbone.layers[i] = _Recorder(recorded, last=i == len(layers) - 1, layer=layers[i])
            try:
                with torch.no_grad():
                    self.model(inputs_embeds=hidden, use_cache=False)
            except _Caught:
                pass
            finally:
                for i, layer in enumerate(layers):
                    self.backbone.layers[i] = layer
            self._kwargs[key] = recorded
        return self._kwargs[key][index]

    def _index(self, module: nn.Module) -> int:
        return next(i for i, layer in enumerate(self.backbone.layers) if layer is module)

    @contextmanager
    def layer(
        self, index: int, tensors: dict[str, torch.Tensor], unread: Collection[str] = ()
    ) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with real weights while the block runs; back to meta after.

        ``tensors`` are named relative to the layer (``self_attn.q_proj.weight``...), fused layout.
        ``unread`` names tensors the caller's passes never read (a statistics pass's routed down
        projection): they are neither moved nor converted, and their storage is left uninitialised.
        """
        module = self.backbone.layers[index]
        state = {
            n: aligned(on_device(t, self.device, self.dtype)) for n, t in tensors.items() if n not in unread
        }
        for name in self._turned & state.keys():
            state[name] = state[name].transpose(1, 2)
        _materialise(module, state, self.device, unread)
        try:
            yield module
        finally:
            self.backbone.layers[index] = module.to("meta")

    def run_layer(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``hidden``, carrying what the layer hands the next one, if anything."""
        kwargs = self.layer_kwargs(hidden, self._index(module))
        if CARRIED_KWARG in kwargs:
            kwargs = {**kwargs, CARRIED_KWARG: carried(hidden)}
        with torch.no_grad():
            out = module(hidden, **kwargs)
        if not isinstance(out, tuple):
            return out
        return with_carried(out[0], out[1]) if CARRIED_KWARG in kwargs else out[0]

    @staticmethod
    @contextmanager
    def capture_residual(module: nn.Module, into: list[torch.Tensor | None]) -> Iterator[None]:
        """While the block runs, each forward pass of ``module`` appends its post-attention residual
        stream ``h`` (the input of the norm before its MLP) to ``into``."""
        hook = _mlp_norm(module).register_forward_pre_hook(lambda _, args: into.append(args[0].detach()))
        try:
            yield
        finally:
            hook.remove()

    @staticmethod
    def has_mlp_half(module: nn.Module) -> bool:
        """Whether the layer can be finished from its residual stream (see the module docstring): not
        where it runs attention beside its MLP, nor where it hands its attention's state on (GLM-5's),
        which the residual stream does not carry, nor where it adds its parts otherwise (FlexOlmo's, Beam's)."""
        mixes = any(hasattr(module, n) for n in ("self_attn", "linear_attn", "conv"))  # Qwen3-Next, LFM2
        hands_on = CARRIED_KWARG in inspect.signature(module.forward).parameters
        halves = _mlp_norm(module) is not None and _first(module, MLP_NAMES) is not None
        # layers that normalize the MLP's output under this name add their parts otherwise: FlexOlmo's
        # feed the MLP the un-normed residual stream, Beam's weigh it against each update by depth
        otherwise = hasattr(module, "post_feedforward_layernorm")
        return mixes and not hands_on and halves and not otherwise

    @staticmethod
    def run_mlp_half(module: nn.Module, residual: torch.Tensor) -> torch.Tensor:
        """The decoder layer after its attention: ``h + mlp(norm(h))`` (normed after the MLP too where the
        layer does so), as the layer itself adds them, so the result is bit-identical to
        :meth:`run_layer` on the layer's input."""
        with torch.no_grad():
            out = _first(module, MLP_NAMES)(_mlp_norm(module)(residual))
            if isinstance(out, tuple):  # with the router's logits, flattened to tokens (Llama 4's)
                out = out[0].view(residual.shape)
            if hasattr(module, "post_mlp_layernorm"):
                out = module.post_mlp_layernorm(out)
            return residual + out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's logits, scaled and capped where the model does so (Cohere's ``logit_scale``,
        Granite's ``logits_scaling`` divisor, Beam's ``final_logit_softcapping``): a distribution sharper
        or flatter than the model's would misstate every KL measured on it."""
        with torch.no_grad():
            logits = self.model.lm_head(self.final_norm(hidden))
            scale = getattr(self.model, "logit_scale", None)
            logits = logits if scale is None else logits * scale
            divisor = getattr(self.config, "logits_scaling", None)
            logits = logits if divisor in (None, 1) else logits / divisor
            cap = getattr(self.config, "final_logit_softcapping", None)
            return logits if cap is None else torch.tanh(logits.float() / cap) * cap
