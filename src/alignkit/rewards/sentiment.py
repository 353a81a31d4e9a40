"""A programmatic gold reward for the demo: positive sentiment, scored by VADER.

The controlled sentiment-generation task of the DPO paper (Rafailov et al. 2023, section 6.1) asks a
policy to produce positive text and scores it with a sentiment classifier that plays the role of the
"true" reward. We use the lexicon-and-rules scorer VADER (Hutto and Gilbert 2014, "VADER: A
Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text") instead of a neural
classifier: it is deterministic, needs no weights and scores thousands of sentences per second on a
CPU, so a pipeline can label data and evaluate with it in a few seconds.

Use it as ``python:alignkit.rewards.sentiment:vader_compound``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, List


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError("the sentiment gold reward needs the vaderSentiment package: "
                          "pip install 'alignkit[demo]'  (or pip install vaderSentiment)") from None
    return SentimentIntensityAnalyzer()


def vader_compound(prompts: List[Any], completions: List[str], **_: Any) -> List[float]:
    """VADER's compound sentiment of each completion, in [-1, 1] (0.0 for an empty one).

    The compound score sums the valence of the lexicon words (adjusted for negation, intensifiers,
    "but" and punctuation) and squashes the sum x to x / sqrt(x^2 + 15). Examples:
    "What a wonderful day!" -> 0.6114, "This is a table." -> 0.0, "I hate rain." -> -0.5719.
    The prompt is ignored: the reward judges the response alone.
    """
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) if text.strip() else 0.0 for text in completions]
