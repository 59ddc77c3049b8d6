"""Published scores to put beside measured ones: the Gemma report's Table 6 (pretrained Gemma
2B and 7B) and Google's Gemma 3 270M model card (REFERENCE.md). They are never results.

Each row names the gemmakit tasks that measure it (the first found in a run is shown) and the
protocol the publication used, which may differ from the run's (the table shows both).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedRow:
    benchmark: str  # as Table 6 prints it
    tasks: tuple[str, ...]  # gemmakit task names that measure it
    protocol: str  # Table 6's protocol column ("" where it gives none)
    gemma_2b: float | None
    gemma_7b: float | None
    card_270m_pt: float | None = None  # the Gemma 3 270M model card, pretrained
    card_270m_it: float | None = None  # and instruction-tuned
    card_shots: str = ""  # the card's shot counts


TABLE6: tuple[PublishedRow, ...] = (
    PublishedRow("MMLU", ("mmlu",), "5-shot, top-1", 42.3, 64.3),
    PublishedRow("HellaSwag", ("hellaswag",), "0-shot", 71.4, 81.2, 40.9, 37.7, "10 PT, 0 IT"),
    PublishedRow("PIQA", ("piqa",), "0-shot", 77.3, 81.2, 67.7, 66.2, "0"),
    PublishedRow("SIQA", ("siqa",), "0-shot", 49.7, 51.8),
    PublishedRow("BoolQ", ("boolq",), "0-shot", 69.4, 83.2, 61.4, None, "0"),
    PublishedRow(
        "WinoGrande", ("winogrande",), "partial scoring", 65.4, 72.3, 52.0, 52.3, "5 PT, 0 IT"
    ),
    PublishedRow("CommonsenseQA", ("commonsense_qa",), "7-shot", 65.3, 71.3),
    PublishedRow("OpenBookQA", ("openbookqa",), "", 47.8, 52.8),
    PublishedRow("ARC-e", ("arc_easy",), "", 73.2, 81.5, 57.7, None, "0"),
    PublishedRow("ARC-c", ("arc_challenge",), "", 42.1, 53.2, 29.0, 28.2, "25 PT, 0 IT"),
    PublishedRow("TriviaQA", ("triviaqa",), "5-shot", 53.2, 63.4, 15.4, None, "5"),
    PublishedRow(
        "NaturalQuestions", ("nq", "naturalquestions", "natural_questions"), "5-shot", 12.5, 23.0
    ),
    PublishedRow("HumanEval", ("humaneval",), "pass@1", 22.0, 32.3),
    PublishedRow("MBPP", ("mbpp",), "3-shot", 29.2, 44.4),
    PublishedRow("GSM8K", ("gsm8k",), "maj@1", 17.7, 46.4),
    PublishedRow("MATH", ("math", "hendrycks_math"), "4-shot", 11.8, 24.3),
    PublishedRow("AGIEval", ("agieval",), "", 24.2, 41.7),
    PublishedRow("BBH", ("bbh",), "", 35.2, 55.1, None, 26.7, "few"),
)

# model-card scores of tasks outside Table 6
CARD_OTHER: tuple[PublishedRow, ...] = (
    PublishedRow("IFEval", ("ifeval",), "", None, None, None, 51.2, "0"),
)
