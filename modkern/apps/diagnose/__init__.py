"""``modkern diagnose``: how much modality interference does a model have?

``items`` (what is diagnosed, the built-in tasks), ``conditions`` (the interferences), ``models``
(how a model is fed), ``metrics`` (what is measured), ``report`` (table and picture) and ``run``
(:func:`diagnose`, which ties them together; its docstring describes the diagnosis).
"""

from modkern.apps.diagnose.conditions import CONDITIONS, Condition, ConditionContext, resolve_conditions
from modkern.apps.diagnose.items import (
    KINDS,
    TOKENIZER_FILE,
    DiagnoseError,
    Item,
    av_task_items,
    image_task_items,
    task_words,
)
from modkern.apps.diagnose.metrics import attention_share, cohens_d, compare, item_metrics
from modkern.apps.diagnose.models import Collator, ModelSpec, load_model
from modkern.apps.diagnose.report import format_table, plot_report
from modkern.apps.diagnose.run import diagnose, diagnose_compare

__all__ = [
    "CONDITIONS",
    "KINDS",
    "TOKENIZER_FILE",
    "Collator",
    "Condition",
    "ConditionContext",
    "DiagnoseError",
    "Item",
    "ModelSpec",
    "attention_share",
    "av_task_items",
    "cohens_d",
    "compare",
    "diagnose",
    "diagnose_compare",
    "format_table",
    "image_task_items",
    "item_metrics",
    "load_model",
    "plot_report",
    "resolve_conditions",
    "task_words",
]
