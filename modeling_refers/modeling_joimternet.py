"""JoImTeRNet (Shaikh et al., MLMI 2021; code mshaikh2/JoImTeR_MLMI_2021): joint image-text representation learning
by global image-sentence matching and local region-word matching.

- Regions are the view encoder's tokens (the radiograph transformer's patch tokens, or a CNN's feature-map cells) of
  every real view of a study; words are the report encoder's token states ([CLS] and padding left out).
- Local matching is AttnGAN's DAMSM: every word attends to the regions (a softmax over words, then over regions
  sharpened by gamma1 = 4), the word-context cosines are pooled with gamma2 = 5 into one study-report score.
- Both scores (global cosine, local DAMSM) are scaled by gamma3 = 10 and trained both ways with a cross-entropy over
  the batch, plus a triplet ranking loss with the hardest negative (margin 0.5), both ways.

Built from REFERS's parts (view encoder, view fusion, BERT report encoder, projections) by subclassing
`RefersForPreTraining`; no report decoder. Configured by [`JoImTeRNetConfig`] (`model_type="joimternet"`).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput
from transformers.utils import can_return_tuple

from .configuration_joimternet import JoImTeRNetConfig
from .modeling_refers import (
    RefersBackbone,
    RefersForImageClassification,
    RefersForPreTraining,
    RefersModel,
    pool_report_tokens,
)

DAMSM_GAMMAS = (4.0, 5.0, 10.0)  # gamma1, gamma2, gamma3 (AttnGAN / JoImTeRNet)
TRIPLET_MARGIN = 0.5


def damsm_scores(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
                 gamma1: float = 4.0, gamma2: float = 5.0) -> torch.Tensor:
    """AttnGAN's word-level matching score of every study with every report.

    `regions` `(n, R, d)` with `region_mask` `(n, R)`; `words` `(b, W, d)` with `word_mask` `(b, W)`. For study i and
    report j: `e = region . word` (all pairs), a softmax over the words of j (for each region), then `gamma1 * e`
    softmax over the regions of i gives each word's context `c_w`; the score is
    `log(sum_w exp(gamma2 * cos(c_w, w))) / gamma2` over the real words. Returns `(n, b)`.
    """
    region_mask, word_mask = region_mask.bool(), word_mask.bool()
    raw = torch.einsum("nrd,bwd->nbrw", regions, words)  # (n, b, R, W)
    attention = raw.masked_fill(~word_mask[None, :, None, :], torch.finfo(raw.dtype).min).softmax(dim=-1)
    attention = (gamma1 * attention).masked_fill(~region_mask[:, None, :, None], torch.finfo(raw.dtype).min)
    attention = attention.softmax(dim=2)  # over regions, for every word
    context = torch.einsum("nbrw,nrd->nbwd", attention, regions)  # (n, b, W, d)
    cosine = nn.functional.cosine_similarity(context, words[None], dim=-1)  # (n, b, W)
    pooled = (gamma2 * cosine).masked_fill(~word_mask[None], float("-inf")).logsumexp(dim=-1)
    return pooled / gamma2


def matching_losses(scores: torch.Tensor, gamma3: float = 10.0, margin: float = TRIPLET_MARGIN) -> dict[str, torch.Tensor]:
    """Both directions of a square `(B, B)` study-report score matrix (diagonal = matched pairs): cross-entropy
    over `gamma3 * scores` (rows: study -> report, columns: report -> study) and the triplet ranking loss with the
    hardest negative, `mean_i max_{j != i} [margin - s_ii + s_ij]_+` (and the same over columns)."""
    labels = torch.arange(scores.shape[0], device=scores.device)
    positive = scores.diagonal()
    negatives = scores.masked_fill(torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device), float("-inf"))
    return {
        "ce_study_to_report": nn.functional.cross_entropy(gamma3 * scores, labels),
        "ce_report_to_study": nn.functional.cross_entropy(gamma3 * scores.T, labels),
        "triplet_study_to_report": (margin - positive + negatives.max(dim=1).values).clamp_min(0).mean(),
        "triplet_report_to_study": (margin - positive + negatives.max(dim=0).values).clamp_min(0).mean(),
    }


@dataclass
class JoImTeRNetForPreTrainingOutput(ModelOutput):
    """loss = loss_global + loss_local; each the sum of its two cross-entropies and two triplet losses.
    `global_scores` `(B, B)`: cosine of study and sentence embeddings; `local_scores` `(B, B)`: DAMSM scores."""

    loss: torch.Tensor | None = None
    loss_global: torch.Tensor | None = None
    loss_local: torch.Tensor | None = None
    global_scores: torch.Tensor | None = None
    local_scores: torch.Tensor | None = None
    study_embeds: torch.Tensor | None = None
    report_embeds: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    text_hidden_states: tuple[torch.Tensor, ...] | None = None
    text_attentions: tuple[torch.Tensor, ...] | None = None


class JoImTeRNetBackbone(RefersBackbone):
    """[`RefersBackbone`] for a JoImTeRNet folder: what `AutoBackbone` loads from it (feature maps for dense heads such as
    UperNet)."""

    config_class = JoImTeRNetConfig
    _loadable_by = {"AutoBackbone": "modeling_joimternet.JoImTeRNetBackbone"}


class JoImTeRNetModel(RefersModel):
    """[`RefersModel`] for a JoImTeRNet folder (`model_type="joimternet"`): what `AutoModel` loads from it."""

    config_class = JoImTeRNetConfig
    _loadable_by = {"AutoBackbone": "modeling_joimternet.JoImTeRNetBackbone",
                    "AutoModel": "modeling_joimternet.JoImTeRNetModel",
                    "AutoModelForImageClassification": "modeling_joimternet.JoImTeRNetForImageClassification"}


class JoImTeRNetForImageClassification(RefersForImageClassification):
    """[`RefersForImageClassification`] for a JoImTeRNet folder: what `AutoModelForImageClassification` loads from it,
    only the head new."""

    config_class = JoImTeRNetConfig
    _loadable_by = JoImTeRNetModel._loadable_by


class JoImTeRNetForPreTraining(RefersForPreTraining):
    """JoImTeRNet pretraining on REFERS's view encoder (radiograph transformer or CNN) and BERT report encoder.

    Build the config with [`JoImTeRNetForPreTraining.default_config`]. Inputs: studies `(B, V, C, H, W)` with
    `view_mask` (single images `(B, C, H, W)` are one-view studies) and their report tokens.
    """

    config_class = JoImTeRNetConfig
    _loadable_by = {**JoImTeRNetModel._loadable_by,
                    "AutoModelForPreTraining": "modeling_joimternet.JoImTeRNetForPreTraining"}

    def _build_modules(self, config: JoImTeRNetConfig) -> None:
        super()._build_modules(config)
        self.region_projection = nn.Linear(config.hidden_size, config.contrastive_dim)

    @classmethod
    def default_config(cls, **overrides) -> JoImTeRNetConfig:
        """A [`JoImTeRNetConfig`] (JoImTeRNet's defaults), then `overrides`."""
        return JoImTeRNetConfig(**overrides)

    @can_return_tuple
    def forward(self, pixel_values=None, view_mask=None, input_ids=None, attention_mask=None, return_loss=True,
                **kwargs) -> JoImTeRNetForPreTrainingOutput:
        r"""
        pixel_values (`(batch, V, C, H, W)`), view_mask (`(batch, V)`): studies; input_ids, attention_mask
        (`(batch, T)`): their reports.
        output_hidden_states, output_attentions, return_dict: as in transformers (`hidden_states` / `attentions` the
            radiograph transformer's, `text_hidden_states` / `text_attentions` the report encoder's).
        """
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        if view_mask is None:
            view_mask = torch.ones(pixel_values.shape[:2], dtype=torch.long, device=pixel_values.device)
        flags = {k: v for k, v in kwargs.items() if k in ("output_hidden_states", "output_attentions")}
        vision = self.refers(pixel_values, view_mask=view_mask, **flags)
        tokens = vision.last_hidden_state[:, :, 1:]  # (B, V, P, d): every view's regions
        batch_size, num_views, num_regions, _ = tokens.shape
        regions = self.region_projection(tokens.reshape(batch_size, num_views * num_regions, -1))
        region_mask = view_mask.bool()[:, :, None].expand(-1, -1, num_regions).reshape(batch_size, -1)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **flags)
        words = self.text_projection(text.last_hidden_state[:, 1:])  # [CLS] left out
        word_mask = attention_mask[:, 1:].bool() if attention_mask is not None else torch.ones_like(
            input_ids[:, 1:], dtype=torch.bool)
        study_embeds = self._study_embeds(vision.study_embeds)
        report_embeds = self.text_projection(pool_report_tokens(text, attention_mask, self.config.text_pooling))
        gamma1, gamma2, gamma3 = DAMSM_GAMMAS
        global_scores = nn.functional.normalize(study_embeds, dim=-1) @ nn.functional.normalize(report_embeds,
                                                                                               dim=-1).T
        local_scores = damsm_scores(regions, region_mask, words, word_mask, gamma1, gamma2)
        loss = loss_global = loss_local = None
        if return_loss:
            loss_global = sum(matching_losses(global_scores, gamma3).values())
            loss_local = sum(matching_losses(local_scores, gamma3).values())
            loss = loss_global + loss_local
        return JoImTeRNetForPreTrainingOutput(loss=loss, loss_global=loss_global, loss_local=loss_local,
                                              global_scores=global_scores, local_scores=local_scores,
                                              study_embeds=study_embeds, report_embeds=report_embeds,
                                              hidden_states=vision.hidden_states, attentions=vision.attentions,
                                              text_hidden_states=text.hidden_states, text_attentions=text.attentions)


__all__ = ["DAMSM_GAMMAS", "JoImTeRNetBackbone", "JoImTeRNetForImageClassification", "JoImTeRNetForPreTraining",
           "JoImTeRNetModel", "damsm_scores", "matching_losses"]
