"""The composed model: frozen base LM + (optional) adapter + (optional) frozen CLIP tower.

`MMAdapter` owns no trainable weights of its own: the adapter does. `use_adapter` (or `adapter=` per call)
selects another adapter over the same base without copying it. Towers are compared by towers.is_tower:
`shared_tower` finds or builds the one an adapter names, `adopt_tower` gives it to the adapter (the first
becomes the model's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import Adapter
from .compiled_step import BackgroundCompile
from .config import AdapterConfig, VisionConfig
from .feature_cache import FeatureCache
from .generate import Sampling, TextStream, decode_tokens, text_pieces
from .llama import AdapterKV, Llama
from .loss import head_cross_entropy
from .tokenizer import Tokenizer
from .towers import is_tower, tower_key
from .tuning import RowTuning
from .weights import DEFAULT_BASE, load_base_checkpoint

_UNSET: Any = object()


class MMAdapter(nn.Module):
    def __init__(self, base: Llama, tokenizer: Tokenizer | None, *, adapter: Adapter | None = None,
                 vision: nn.Module | None = None, base_name: str = "", base_fingerprint: str = "",
                 template: str | None = None) -> None:
        super().__init__()
        self.base, self.tokenizer, self.adapter = base, tokenizer, adapter
        self.base_name, self.base_fingerprint = base_name, base_fingerprint
        self.base_source = base_name  # what load_base was given (a local path made absolute), set by load_base
        self.template = template or ("chat" if tokenizer is not None and tokenizer.chat_template else "alpaca")
        self.vision: nn.Module | None = None
        self.feature_cache: FeatureCache | None = None
        self.towers: dict[tuple, nn.Module] = {}  # towers built for loaded adapters, by tower_key (not submodules)
        self.compiled_decoding: BackgroundCompile | None = None  # see compile_decoding
        if vision is not None:
            self.attach_vision(vision)

    # ------------------------------------------------------------------------------------------
    # composition: the package sets the model's parts (tower, feature cache, adapter) only through these

    @property
    def device(self) -> torch.device:
        """Where the base's weights live; inputs, adapters and towers are put there."""
        return self.base.device

    def attach_vision(self, vision: VisionConfig | nn.Module) -> nn.Module:
        """Add a frozen image tower (built from a VisionConfig, or given) on the base's device.

        A model with a tower always has a feature cache; an existing one is kept (it keys features by
        tower fingerprint, so features of another tower are never read back).
        """
        if isinstance(vision, VisionConfig):
            from .vision import VisionTower

            vision = VisionTower(vision)
        self.vision = vision.to(self.device).requires_grad_(False)
        if self.feature_cache is None:
            self.use_feature_cache(FeatureCache())
        return self.vision

    def shared_tower(self, config: VisionConfig) -> nn.Module:
        """The frozen tower `config` names: the model's own when it is that one, else one built once and
        shared by every adapter trained over it (kept in `towers`, not as a submodule: it belongs to those
        adapters, not to the model). Which towers are the same is towers.is_tower's rule."""
        for tower in (self.vision, *self.towers.values()):
            if tower is not None and hasattr(tower, "config") and is_tower(tower, config):
                return tower
        from .vision import VisionTower

        tower = VisionTower(config).to(self.device).requires_grad_(False)
        return self.towers.setdefault(tower_key(tower.config), tower)  # the same weights found elsewhere: one

    def adopt_tower(self, adapter: Adapter, tower: nn.Module | None) -> None:
        """Give a loaded adapter the tower it was trained with: the first tower becomes the model's
        (training and text+image calls use it); an adapter over another tower holds its own."""
        if tower is not None and self.vision is None:
            self.attach_vision(tower)
        if tower is not self.vision:
            adapter.use_tower(tower)

    def detach_vision(self) -> None:
        """Drop the image tower and its feature cache (a text-only model again)."""
        self.vision, self.feature_cache = None, None

    def use_feature_cache(self, cache: FeatureCache) -> None:
        """Swap the cache of tower features (e.g. for one backed by a directory that survives runs)."""
        self.feature_cache = cache

    def use_adapter(self, adapter: Adapter | None) -> None:
        """Make `adapter` the default of every call (None: the plain base); it moves to the base's device."""
        self.adapter = None if adapter is None else adapter.to(self.device)

    def freeze(self) -> None:
        """Mark the base and the tower frozen: only the adapter's parameters can train."""
        self.base.requires_grad_(False)
        if self.vision is not None:
            self.vision.requires_grad_(False)

    def frozen_prefix(self, tokens: Tensor) -> Tensor:
        """Hidden states [B, T, C] after the frozen layers below the adapter (what the prefix cache stores)."""
        if self.adapter is None:
            raise ValueError("the frozen prefix is the part below the adapter; this model has no adapter")
        tuning = RowTuning.single(self.adapter.tuning) if self.adapter.tuning is not None else None
        return self.base.prefix(tokens, n_layers=self.adapter.first_layer, tuning=tuning)

    # ------------------------------------------------------------------------------------------
    # building

    def add_adapter(self, config: AdapterConfig | None = None, seed: int | None = None) -> Adapter:
        """A fresh trainable adapter (zero gates: the model still equals the base) on the base's device."""
        if seed is not None:
            torch.manual_seed(seed)
        vision_config = getattr(self.vision, "config", None)
        feature_dim = getattr(self.vision, "feature_dim", None)
        self.use_adapter(Adapter(config or AdapterConfig(), self.base.config, vision_config, feature_dim))
        if self.adapter.tuning is not None:
            self.adapter.tuning.copy_base_norms(self.base)  # tuned norms start as the base's: same model at step 0
        return self.adapter

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [] if self.adapter is None else [p for p in self.adapter.parameters() if p.requires_grad]

    def summary(self) -> str:
        c = self.base.config
        lines = [f"base: {self.base_name or c.name} ({c.n_layers} layers, dim {c.dim}, {c.n_heads} heads / "
                 f"{c.n_kv_heads} kv heads, {sum(p.numel() for p in self.base.parameters()) / 1e6:.1f}M frozen)"]
        if self.vision is not None:
            lines.append(f"vision: {getattr(self.vision, 'fingerprint', type(self.vision).__name__)} (frozen)")
        if self.adapter is None:
            lines.append("adapter: none")
        else:
            a = self.adapter
            lines.append(f"adapter: K={a.config.n_prompts} prompts x L={a.n_layers} layers "
                         f"(layers {a.first_layer}-{c.n_layers - 1}); trainable parameters:")
            lines += [f"  {part:<10} {n:>12,}" for part, n in a.parameter_counts().items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------
    # forward passes

    def tower_for(self, adapter: Adapter | None = _UNSET) -> nn.Module | None:
        """The image tower an adapter was trained with (its own when it differs from the model's)."""
        adapter = self.adapter if adapter is _UNSET else adapter
        return getattr(adapter, "tower", None) or self.vision

    def image_features(self, images: Sequence[Any | None],
                       adapter: Adapter | None = _UNSET) -> tuple[Tensor | None, Tensor]:
        """Tower features [B, F] for a batch where entries may be None (text-only), and has_image [B]."""
        device = self.device
        has_image = torch.tensor([im is not None for im in images], dtype=torch.bool, device=device)
        if not bool(has_image.any()):
            return None, has_image
        tower = self.tower_for(adapter)
        if tower is None:
            raise ValueError("an image was given but this model has no vision tower: load a multimodal adapter "
                             "(one trained with images)")
        if self.feature_cache is None:  # the tower is an adapter's own and the model has none
            self.use_feature_cache(FeatureCache())
        present = [im for im in images if im is not None]
        feats = self.feature_cache.features(tower, present).to(device)  # [n_present, F]
        out = feats.new_zeros(len(images), feats.shape[-1])
        out[has_image] = feats
        return out, has_image

    def adapter_kv(self, image_features: Tensor | None = None, has_image: Tensor | None = None,
                   adapter: Adapter | None = _UNSET) -> AdapterKV | None:
        """The request's state: prompt K/V for this batch (through autograd when training), gates and the V2
        tuning terms every row uses; None without an adapter. The base itself is never changed: the state
        carries all that is the adapter's, so requests with different adapters can run at once."""
        adapter = self.adapter if adapter is _UNSET else adapter
        if adapter is None:
            if image_features is not None:
                raise ValueError("images need an adapter with a projector; this model has no adapter")
            return None
        image_tokens = None
        if image_features is not None:
            image_tokens = adapter.image_tokens(image_features, has_image)  # [B, C]
        kv = adapter.prompt_kv(self.base, image_tokens)
        if adapter.tuning is not None:
            kv.tuning = RowTuning.single(adapter.tuning)  # V2 biases, norms and LoRA, for every row
        return kv

    def forward(self, tokens: Tensor, image_features: Tensor | None = None, has_image: Tensor | None = None,
                adapter: Adapter | None = _UNSET) -> Tensor:
        """Logits [B, T, V]."""
        kv = self.adapter_kv(image_features, has_image, adapter)
        return self.base.head(self.base(tokens, adapter=kv))

    def loss(self, tokens: Tensor, labels: Tensor, image_features: Tensor | None = None,
             has_image: Tensor | None = None, prefix: Tensor | None = None,
             reduction: str = "mean", sample_weights: Tensor | None = None) -> Tensor:
        """Next-token cross-entropy on labelled positions only (labels -100 elsewhere); with sample_weights
        [B], every labelled position of sample b counts sample_weights[b] times.

        The LM head runs only where a label exists, which skips most of the vocab projection for
        instruction data, in chunks that never hold all logits (loss.py). `prefix` is the cached
        output of the frozen layers below the adapter.
        """
        kv = self.adapter_kv(image_features, has_image)
        if prefix is not None:
            if kv is None:
                raise ValueError("the frozen-prefix cache needs an adapter")
            h = self.base(hidden=prefix, start_layer=kv.first_layer, adapter=kv)
        else:
            h = self.base(tokens, adapter=kv)  # [B, T, C]
        targets = labels[:, 1:]  # position t predicts token t+1
        selected = targets != -100
        row_weights = None if sample_weights is None else sample_weights[:, None].expand_as(targets)[selected]
        return head_cross_entropy(h[:, :-1][selected], self.base.head_weight(), targets[selected], reduction,
                                  row_weights)

    def last_token_logprobs(self, prompts: Sequence[Sequence[int]], images: Sequence[Any | None],
                            adapter: Adapter | None = _UNSET) -> Tensor:
        """Next-token log-probabilities [B, V] (fp32) after each prompt's last token: one right-padded pass.

        Right padding needs no mask: causal attention keeps the padding after a row's last real token
        out of it. Used to score answers (e.g. the option letters of a multiple-choice question).
        """
        device = self.device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        pad_id = self._require_tokenizer().pad_id
        tokens = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long, device=device)
        for row, ids in enumerate(prompts):
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        with torch.inference_mode():
            features, has_image = self.image_features(images, adapter)
            hidden = self.base(tokens, adapter=self.adapter_kv(features, has_image, adapter))  # [B, T, C]
            last = hidden[torch.arange(len(prompts), device=device), lengths - 1]  # [B, C]
            return self.base.head(last).float().log_softmax(-1)

    # ------------------------------------------------------------------------------------------
    # generation

    def template_for(self, adapter: Adapter | None = _UNSET) -> str:
        """The prompt template of an adapter (the one it was trained with), else the model's default."""
        adapter = self.adapter if adapter is _UNSET else adapter
        return (adapter.template if adapter is not None else None) or self.template

    def prompt_ids(self, prompt: str, template: str | None = None, history: Sequence[tuple[str, str]] = (),
                   adapter: Adapter | None = _UNSET) -> list[int]:
        """Token ids of a user prompt rendered with a template ("raw" = the text as is)."""
        tok = self._require_tokenizer()
        return tok.encode(self.prompt_text(prompt, template, history, adapter), bos=tok.add_bos)

    def prompt_text(self, prompt: str, template: str | None = None, history: Sequence[tuple[str, str]] = (),
                    adapter: Adapter | None = _UNSET) -> str:
        """The full text `prompt_ids` encodes: the prompt (and history) rendered with a template."""
        tok = self._require_tokenizer()
        name = template or self.template_for(adapter)
        if name == "raw":
            return prompt
        from .data.templates import get_template

        return get_template(name).prompt(prompt, history=history, tokenizer=tok)

    def fit_prompt(self, prompt: str, history: Sequence[tuple[str, str]] = (), max_prompt_tokens: int | None = None,
                   template: str | None = None, adapter: Adapter | None = _UNSET) -> tuple[str, list[tuple[str, str]], str | None]:
        """Shorten a chat to fit `max_prompt_tokens`: drop the oldest turns, then cut the prompt's end.

        Returns (prompt, history, note) where note says what was cut (None when nothing was).
        """
        limit = max_prompt_tokens or self.base.config.max_seq_len // 2
        history = list(history)

        def n_tokens(p: str, h: Sequence[tuple[str, str]]) -> int:
            return len(self.prompt_ids(p, template, h, adapter))

        dropped = 0
        while history and n_tokens(prompt, history) > limit:
            history.pop(0)
            dropped += 1
        note = f"dropped the {dropped} oldest turn(s) of the conversation to fit the context" if dropped else None
        if n_tokens(prompt, history) <= limit:
            return prompt, history, note
        lo, hi = 0, len(prompt)  # longest prefix of the prompt that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if n_tokens(prompt[:mid], history) <= limit else (lo, mid - 1)
        cut = f"the question was truncated to its first {lo:,} of {len(prompt):,} characters to fit the context " \
              f"of {limit:,} tokens"
        return prompt[:lo], history, cut if note is None else f"{note}; {cut}"

    def generate(self, prompt: str | Sequence[str], image: Any = None, *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (),
                 seed: int | None = None, template: str | None = None, history: Sequence[Any] = (),
                 adapter: Adapter | None = _UNSET) -> str | list[str]:
        """Complete one prompt (returns str) or a batch (list of prompts, images: list; returns list).

        history: earlier (question, answer) turns of a chat; for a batch, one such list per prompt.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        images = [image] if single else list(image) if image is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        histories = [history] if single else list(history) if history else [()] * len(prompts)
        if len(histories) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(histories)} histories; for a batch pass one list of "
                             "(question, answer) turns per prompt")
        s = Sampling(max_new_tokens, temperature, top_p, top_k, seed)
        streams = [TextStream(self._require_tokenizer(), stop) for _ in prompts]
        ids = [self.prompt_ids(p, template, h, adapter) for p, h in zip(prompts, histories)]
        for step in self._decode(ids, images, s, adapter):
            for stream, token in zip(streams, step.tolist()):
                if not stream.stopped and token not in self.tokenizer.eos_ids:
                    stream.push(token)
            if all(st.stopped for st in streams):
                break
        texts = [st.text() if not st.stopped else _cut_at_stop(st.text(), stop) for st in streams]
        return texts[0] if single else texts

    def stream(self, prompt: str, image: Any = None, *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (), seed: int | None = None,
               template: str | None = None, history: Sequence[tuple[str, str]] = (),
               adapter: Adapter | None = _UNSET) -> Iterator[str]:
        """Yield text pieces as they are decoded; joined, they equal `generate(...)`.

        history: earlier (question, answer) turns of a chat, rendered with the template.
        """
        s = Sampling(max_new_tokens, temperature, top_p, top_k, seed)
        ids = self.prompt_ids(prompt, template, history, adapter)
        tokens = (int(step[0]) for step in self._decode([ids], [image], s, adapter))
        yield from text_pieces(tokens, self._require_tokenizer(), stop)

    def _decode(self, prompts: list[list[int]], images: list[Any], s: Sampling,
                adapter: Adapter | None) -> Iterator[Tensor]:
        with torch.inference_mode():
            feats, has_image = self.image_features(images, adapter)
            kv = self.adapter_kv(feats, has_image, adapter)  # once per request, reused by every step
        step = self.compiled_decoding.step() if self.compiled_decoding is not None else None
        yield from decode_tokens(self.base, prompts, kv, s, self.tokenizer.eos_ids, step)

    def compile_decoding(self, budget_s: float = 60.0) -> BackgroundCompile:
        """Decode single prompts with a `torch.compile`d step from the first request on that it is ready (it
        compiles in the background; until then, and whenever it fails, decoding is eager)."""
        self.compiled_decoding = BackgroundCompile(self.base, budget_s)
        return self.compiled_decoding

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this base has no tokenizer (a random-weight preset?); pass token ids to forward()")
        return self.tokenizer


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def load_base(spec: str = DEFAULT_BASE, dtype: torch.dtype | str | None = None,
              device: str | torch.device | None = None) -> MMAdapter:
    """A frozen base with its tokenizer and no adapter: an embedded name, a preset, a path or a hub id."""
    loaded = load_base_checkpoint(spec, dtype=dtype, device=device)
    model = MMAdapter(loaded.model, loaded.tokenizer, base_name=loaded.name, base_fingerprint=loaded.fingerprint)
    local = Path(spec).expanduser()
    model.base_source = str(local.resolve()) if local.exists() else str(spec)  # load_base(base_source) again
    return model


def build_model(base: str | MMAdapter = DEFAULT_BASE, adapter: AdapterConfig | None = None,
                vision: VisionConfig | None = None, *, dtype: torch.dtype | str | None = None,
                device: str | torch.device | None = None, seed: int | None = None) -> MMAdapter:
    """Base + a fresh adapter (+ a frozen CLIP tower and a projector when `vision` is given)."""
    model = base if isinstance(base, MMAdapter) else load_base(base, dtype=dtype, device=device)
    if vision is not None:
        model.attach_vision(vision)
    model.add_adapter(adapter or AdapterConfig(), seed=seed)
    return model
