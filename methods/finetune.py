"""Fine-tuning: no penalty, no importance. The lower bound every regulariser is compared with."""

from __future__ import annotations

from methods import Importance, Method, register


@register
class Finetune(Method):
    name, summary = "finetune", "no penalty (plain fine-tuning of the trunk, one head per task)"
    penalised = False

    def label(self) -> str:
        return "finetune"

    def importance(self, model, task) -> Importance:
        return self.zeros(model)
