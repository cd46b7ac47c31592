"""A causal language model built from generated layers, for Hugging Face `transformers` (an optional extra:
`pip install ttr[models]`).

    config = TTRConfig(vocab_size=..., hidden_size=512, num_hidden_layers=8, num_heads=8,
                       layers=["gated_delta_rule"] * 3 + ["softmax_attention"])   # a hybrid, repeated
    model = TTRForCausalLM(config)
    model.generate(input_ids, max_new_tokens=20)

Each block is pre-norm: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)); the mixer of block i is the layer
module of the generated package `layers[i % len(layers)]` (importable as `<package>.<name>`, the repository's
`generated` by default), built with fla's layer API and `layer_kwargs`. Generation carries every mixer's state
in one `TTRCache` (fla's cache protocol; each layer reads its own entry).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

__all__ = ["TTRCache", "TTRConfig", "TTRForCausalLM", "TTRModel"]

# transformers' outputs name the cache `cache` from some 5.x release on, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class TTRConfig(PretrainedConfig):
    """The model's shape and the generated layers its blocks mix with.

    layers: spec names (generated packages), one per block or a pattern repeated over num_hidden_layers.
    package: the Python package that holds them. layer_kwargs: passed to every layer (e.g. use_short_conv).
    intermediate_size: the SwiGLU's width (default 8/3 of hidden_size, rounded up to a multiple of 64).
    """

    model_type = "ttr"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 512, num_hidden_layers: int = 4,
                 num_heads: int = 4, layers: list[str] | None = None, package: str = "generated",
                 layer_kwargs: dict | None = None, intermediate_size: int | None = None, norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = False, use_cache: bool = True,
                 pad_token_id: int | None = None, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 **kwargs) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_heads = num_hidden_layers, num_heads
        self.layers = list(layers or ["gated_delta_rule"])
        self.package = package
        self.layer_kwargs = dict(layer_kwargs or {})
        self.intermediate_size = intermediate_size or 64 * -(-hidden_size * 8 // 3 // 64)
        self.norm_eps, self.initializer_range, self.use_cache = norm_eps, initializer_range, use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_name(self, index: int) -> str:
        return self.layers[index % len(self.layers)]


class TTRCache:
    """Every mixer's state between generation steps: `cache[i]` is block i's dict (fla's protocol, as the
    generated layers read and write it), with what `generate` asks of a cache (the tokens seen, reordering
    for beam search)."""

    is_compileable = False

    def __init__(self) -> None:
        self.states: list[dict] = []
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> dict:
        return self.states[layer_idx]

    def update(self, layer_idx: int = 0, offset: int = 1, **states) -> dict:
        if layer_idx > len(self.states):
            raise ValueError(f"TTRCache.update: layer {layer_idx} stores before layer {len(self.states)} has")
        if layer_idx == len(self.states):
            self.states.append(states)
        else:
            self.states[layer_idx] = states
        if layer_idx == 0:
            self.seen_tokens += offset
        return states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens if len(self.states) > layer_idx else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows of every state in the order of `beam_idx` (beam search)."""
        def pick(x):
            if isinstance(x, torch.Tensor):
                return x.index_select(0, beam_idx.to(x.device))
            if isinstance(x, tuple):
                return tuple(pick(part) for part in x)
            if isinstance(x, list):  # an attention cache kept per row
                return [x[i] for i in beam_idx.tolist()]
            return x
        self.states = [{name: pick(value) for name, value in state.items()} for state in self.states]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def layer_class(package: str, name: str) -> type[nn.Module]:
    """The layer module of the generated package `<package>.<name>` (its one nn.Module export)."""
    try:
        module = importlib.import_module(f"{package}.{name}")
    except ImportError as error:
        raise ValueError(f"TTRConfig.layers: no generated package {package}.{name} ({error}); generate it with "
                         f"`ttr generate specs/{name}.yaml`, or set `package` to where it lives") from error
    classes = [getattr(module, n) for n in getattr(module, "__all__", [])
               if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), nn.Module)]
    if len(classes) != 1:
        raise ValueError(f"{package}.{name} exports {len(classes)} layer modules, expected one")
    return classes[0]


class TTRBlock(nn.Module):
    def __init__(self, config: TTRConfig, index: int) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mixer = layer_class(config.package, config.layer_name(index))(
            hidden_size=config.hidden_size, num_heads=config.num_heads, layer_idx=index, **config.layer_kwargs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        mixed, _, past_key_values = self.mixer(self.mixer_norm(x), attention_mask=attention_mask,
                                               past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), past_key_values


class TTRPreTrainedModel(PreTrainedModel):
    config_class = TTRConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TTRBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)


class TTRModel(TTRPreTrainedModel):
    def __init__(self, config: TTRConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.blocks = nn.ModuleList(TTRBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, return_dict=True, cache=None, **kwargs) -> BaseModelOutputWithPast:
        past_key_values = cache if past_key_values is None else past_key_values  # transformers' two names
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("TTRModel: give input_ids or inputs_embeds, one of them")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = TTRCache()
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing to unpad
        layer_kwargs = {k: v for k, v in kwargs.items() if k == "cu_seqlens"}
        for block in self.blocks:
            x, past_key_values = block(x, attention_mask, past_key_values, use_cache, **layer_kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x),
                                       **{CACHE_FIELD: past_key_values if use_cache else None})


class TTRForCausalLM(TTRPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: TTRConfig) -> None:
        super().__init__(config)
        self.model = TTRModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the mixers keep recurrent states, not key-value pairs: the model makes its own cache

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, cache=None, **kwargs) -> dict:
        """With a cache, only the tokens it has not seen; the whole mask (its last columns are these tokens')."""
        past_key_values = cache if past_key_values is None else past_key_values
        if past_key_values is not None and len(past_key_values) > 0:
            input_ids = input_ids[:, past_key_values.get_seq_length():]
            inputs_embeds = None
        inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        return {**inputs, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, return_dict=True, logits_to_keep: int = 0, cache=None,
                **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             past_key_values=cache if past_key_values is None else past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden if not logits_to_keep else hidden[:, -logits_to_keep:])
        loss = None
        if labels is not None:  # next-token prediction: position t predicts labels[t + 1]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
