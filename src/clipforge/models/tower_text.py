"""Any HF ``AutoModel`` text encoder as a text tower (MiniLM-L6 is the shipped one), mean pooled.

Split for caching: the frozen prefix is embeddings + the first ``L - N`` layers, the trainable rest the
last ``N`` layers + pooling. A locked tower (N = 0) returns the pooled vector ``{"pooled": [B, H]}``
(fixed-size, cheap to cache); a partly unlocked one returns ``{"hidden": [B, L, H],
"attention_mask": [B, L]}``; a fully trainable one (N = -1) passes the tokens through.

Mean pooling over the attention mask is sentence-transformers' pooling for all-MiniLM-L6-v2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clipforge.models.tokenizer import minilm_dir

NAMED_TEXT_TOWERS = {"minilm-l6": minilm_dir}


def resolve_text_path(name_or_path: str) -> Path:
    if name_or_path in NAMED_TEXT_TOWERS:
        return NAMED_TEXT_TOWERS[name_or_path]()
    p = Path(name_or_path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"text tower {name_or_path!r}: not a named tower ({', '.join(NAMED_TEXT_TOWERS)}) nor a local dir"
        )
    return p


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _layer_list(model: nn.Module) -> nn.ModuleList | None:
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    return None


def load_hf_auto_model(path: str | Path | None, hf_config: dict | None = None) -> nn.Module:
    """Pretrained weights from ``path``, or (``hf_config`` given) a random-init skeleton whose weights
    a saved clipforge model's safetensors will fill: rebuilding needs no original files."""
    from transformers import AutoConfig, AutoModel

    if hf_config is not None:
        d = dict(hf_config)
        return AutoModel.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    return AutoModel.from_pretrained(str(path))


class HFTextTower(nn.Module):
    def __init__(
        self, path: str | Path | None, unlock: int = 0, pool: str = "mean", hf_config: dict | None = None
    ) -> None:
        super().__init__()
        self.model = load_hf_auto_model(path, hf_config)
        self.model.eval()
        path = Path(path or self.model.config.model_type)
        if pool not in ("mean", "cls"):
            raise ValueError(f"text tower: unknown pool {pool!r} (mean | cls)")
        self.pool, self.unlock = pool, unlock
        self.out_dim = int(self.model.config.hidden_size)
        self.layers = _layer_list(self.model)
        n = len(self.layers) if self.layers is not None else 0
        if unlock not in (0, -1) and (self.layers is None or not 0 < unlock <= n):
            raise ValueError(f"text tower {path.name}: unlock={unlock} needs 1..{n} layers ({n} found)")
        self.n_layers = n
        self.n_frozen = n if unlock == 0 else (-1 if unlock == -1 else n - unlock)
        if unlock == 0:
            self.model.requires_grad_(False)
        elif unlock > 0:
            self.model.requires_grad_(False)
            for layer in self.layers[self.n_frozen :]:
                layer.requires_grad_(True)

    @property
    def locked(self) -> bool:
        return self.unlock == 0

    def train(self, mode: bool = True) -> HFTextTower:
        super().train(mode)
        if self.unlock == 0:
            self.model.eval()
        elif self.unlock > 0:  # dropout only in the trainable layers
            self.model.eval()
            for layer in self.layers[self.n_frozen :]:
                layer.train(mode)
        return self

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0] if self.pool == "cls" else mean_pool(hidden, mask)

    def _full(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        out = self.model(input_ids=ids, attention_mask=mask)
        return self._pool(out.last_hidden_state, mask)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.embeddings
        try:
            return emb(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        except TypeError:
            return emb(input_ids=ids)

    def _run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        m = self._attn_mask(hidden, mask)
        for layer in layers:
            out = layer(hidden, m)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _attn_mask(self, hidden: torch.Tensor, mask: torch.Tensor):
        try:
            from transformers.masking_utils import create_bidirectional_mask

            return create_bidirectional_mask(
                config=self.model.config, inputs_embeds=hidden, attention_mask=mask
            )
        except ImportError:  # transformers 4.x: the classic additive mask
            return self.model.get_extended_attention_mask(mask, mask.shape)

    def prefix(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.unlock == -1:
            return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        with torch.no_grad():
            if self.locked:
                return {"pooled": self._full(tokens)}
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
            hidden = self._run_layers(self._embed(ids), mask, self.layers[: self.n_frozen])
        return {"hidden": hidden, "attention_mask": mask}

    def rest(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        if "pooled" in feats:
            return feats["pooled"]
        if "input_ids" in feats:
            return self._full(feats)
        mask = feats["attention_mask"]
        hidden = self._run_layers(feats["hidden"], mask, self.layers[self.n_frozen :])
        return self._pool(hidden, mask)
