"""The threshold-free POPE score: one forward pass, the logit gap between "yes" and "no".

    score_fn = hf_score_fn(model, processor)
    score_fn(images, prompts, yes_texts, no_texts)   # [logit(yes) - logit(no), ...] per probe

For each probe the prompt is rendered exactly as generation renders it (the chat template with
the generation prompt, the image in the user turn); the logits are read at the first answer
position, and the score is the logit of the first token of the "yes" answer minus that of the
"no" answer ("yes"/"no" for short answers, "Yes, there is ..."/"No, there is no ..." otherwise).
Ranking probes by it gives an AUROC that needs no threshold and no parsing, and its sign is the
greedy choice between the two answers.

Batches are right-padded (the answer position is each row's last real token), so no position
ids need correcting and the causal mask keeps the padding out of every real position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from nsft_ray.eval.runner import ScoreFn
from nsft_ray.generation import encode_prompt, render_chats
from nsft_ray.image_features import ImageFeatureCache
from nsft_ray.models import to_model_inputs

__all__ = ["answer_first_token", "yes_no_scores", "hf_score_fn"]


def answer_first_token(processor: ProcessorMixin, text: str) -> int:
    """The id of the first token the model emits when it answers `text` (tokenized in context:
    after the chat template's generation prompt, where a tokenizer may merge differently than at
    the start of a string)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    [prefix] = render_chats(processor, [[{"role": "user",
                                          "content": [{"type": "text", "text": "?"}]}]])
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix + text, add_special_tokens=False)["input_ids"]
    if full[:len(head)] != head or len(full) == len(head):
        raise ValueError(f"cannot find the first token of answer {text!r}: the tokenizer merges it "
                         "into the generation prompt")
    return full[len(head)]


@torch.no_grad()
def yes_no_scores(
    model: PreTrainedModel, processor: ProcessorMixin, images: Sequence[Image.Image],
    prompts: Sequence[str], yes_ids: Sequence[int], no_ids: Sequence[int],
    features: ImageFeatureCache | None = None,
) -> list[float]:
    """logit[yes_ids[i]] - logit[no_ids[i]] at the first answer position of prompt i (with
    `features`, each image's features computed once across calls)."""
    if not (len(images) == len(prompts) == len(yes_ids) == len(no_ids)):
        raise ValueError(f"got {len(images)} images, {len(prompts)} prompts, {len(yes_ids)} yes "
                         f"and {len(no_ids)} no ids; expected one each")
    if not prompts:
        return []
    # Right padding: each row's last real position is then found by its attention mask.
    inputs = to_model_inputs(encode_prompt(processor, images, prompts, padding_side="right"),
                             model)
    if features is not None:
        inputs = features.attach(model, inputs)
    # The backbone's hidden states, then the LM head on one position per row: a full (B, T, V)
    # logits tensor would be large for a real vocabulary and is never needed here.
    hidden = model.model(**inputs).last_hidden_state  # (B, T, H)
    last = inputs["attention_mask"].sum(dim=1) - 1  # (B,) the first answer position's input
    rows = torch.arange(len(prompts), device=hidden.device)
    logits = model.get_output_embeddings()(hidden[rows, last]).float()  # (B, V)
    yes = torch.tensor(list(yes_ids), device=logits.device)
    no = torch.tensor(list(no_ids), device=logits.device)
    return (logits[rows, yes] - logits[rows, no]).tolist()


def hf_score_fn(model: PreTrainedModel, processor: ProcessorMixin,
                features: ImageFeatureCache | None = None) -> ScoreFn:
    """A ScoreFn over a loaded HF model; answer first tokens are looked up once per text."""
    first: dict[str, int] = {}

    def token(text: str) -> int:
        if text not in first:
            first[text] = answer_first_token(processor, text)
        return first[text]

    def score_fn(images: list[Image.Image], prompts: list[str], yes_texts: list[str],
                 no_texts: list[str]) -> list[float]:
        yes, no = [token(t) for t in yes_texts], [token(t) for t in no_texts]
        same = [y for y, n in zip(yes_texts, no_texts, strict=True) if token(y) == token(n)]
        if same:
            raise ValueError(f"answers {same[0]!r} and its negation start with the same token: "
                             "the yes-minus-no score would be 0")
        return yes_no_scores(model, processor, images, prompts, yes, no, features)

    return score_fn
