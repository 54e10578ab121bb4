"""`evaluate` module: per-class ROC AUC and its mean over defined classes (REFERS fine-tuning metric).

Load it from its folder, offline: `evaluate.load("<site-packages>/modeling_refers/metrics/multilabel_auc")`, or
`modeling_refers.metrics.load_multilabel_auc_metric()`. `evaluate` copies this script into its module cache
before importing it, so it imports the installed package absolutely (never `from ..evaluation import`).
"""

import datasets
import evaluate

from modeling_refers.metrics import multilabel_auc


_DESCRIPTION = """\
Area under the ROC curve per class (one-vs-rest, scikit-learn's `roc_auc_score`) and its mean over the classes for
which it is defined, as reported for REFERS (Zhou et al., Nature Machine Intelligence 2022). A class whose references
are all one value has no AUC: it is reported as None, left out of the mean and named in a warning.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per example, C scores (probabilities or logits), or one score for a single binary class.
    references: per example, C multi-hot 0/1 labels (multi-label), or one integer class id (single-label,
        scored one-vs-rest), or one 0/1 label for a single binary class.
    label_names (`list[str]`, *optional*): the C class names (default `class_0`, `class_1`, ...).
Returns:
    per_class (`dict[str, float | None]`): AUC in [0, 1] per class, None where undefined.
    mean_auc (`float | None`): mean over the defined classes.
    undefined (`list[str]`): classes whose references are all one value.
Examples:
    >>> metric = evaluate.load("path/to/modeling_refers/metrics/multilabel_auc")
    >>> metric.compute(predictions=[[0.9, 0.2], [0.1, 0.8], [0.7, 0.4]], references=[[1, 0], [0, 1], [0, 0]],
    ...                label_names=["effusion", "nodule"])
    {'per_class': {'effusion': 1.0, 'nodule': 1.0}, 'mean_auc': 1.0, 'undefined': []}
"""

_CITATION = """\
@article{zhou2022refers,
  title={Generalized radiograph representation learning via cross-supervision between images and free-text radiology reports},
  author={Zhou, Hong-Yu and Chen, Xiaoyu and Zhang, Yinghao and Luo, Ruibang and Wang, Liansheng and Yu, Yizhou},
  journal={Nature Machine Intelligence},
  volume={4},
  number={1},
  pages={32--40},
  year={2022}
}
"""

_SCORES = datasets.List(datasets.Value("float64"))
# References are read as float64 so that soft labels (0.5) or non-integer ids reach the validation in
# `multilabel_auc` and raise, instead of being silently truncated by an integer feature.
_FEATURES = [
    datasets.Features({"predictions": _SCORES, "references": datasets.List(datasets.Value("float64"))}),  # multi-label
    datasets.Features({"predictions": _SCORES, "references": datasets.Value("float64")}),  # single-label class ids
    datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),  # binary
]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultilabelAuc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_FEATURES,
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_auc_score.html"],
        )

    def _compute(self, predictions, references, label_names=None):
        return multilabel_auc(references, predictions, label_names=label_names)
