"""Prompt templates: how a raw question becomes the text a model is asked to continue.

Templates are :meth:`str.format` strings with one ``{question}`` field (literal braces doubled,
as in ``\\boxed{{}}``). Every built-in template uses only characters of
:data:`rltk.data.synthetic.CHARSET`, so the tiny character-level model can read them.
"""

from __future__ import annotations

__all__ = ["TEMPLATES", "format_prompt"]

TEMPLATES: dict[str, str] = {
    # Short prompt for the built-in task and the tiny character-level model.
    "builtin": "Q: {question}\nAnswer in \\boxed{{}}.\nA: ",
    # The same without the instruction: half the tokens, for the quickstart's tiny model, which
    # learns the \boxed{} answer format from its SFT warm start rather than by reading.
    "compact": "Q: {question}\nA: ",
    # The standard instruction of real math models (Qwen2.5-Math, DeepSeek-R1 evaluations).
    "boxed": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "plain": "{question}",
}


def _fill(template: str, question: str) -> str:
    if template in TEMPLATES:
        template = TEMPLATES[template]
    elif "{question}" not in template:
        raise ValueError(
            f"unknown template {template!r}: use one of {sorted(TEMPLATES)} or a custom string containing '{{question}}'"
        )
    try:
        return template.format(question=question)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"custom template {template!r} is not a valid format string ({e}); double literal braces, e.g. \\boxed{{{{}}}}"
        ) from None


def format_prompt(
    question: str,
    template: str = "builtin",
    tokenizer=None,
    chat_template: bool = False,
    system_prompt: str | None = None,
    **chat_template_kwargs,
) -> str:
    """Fill ``template`` (a name in :data:`TEMPLATES` or a custom ``{question}`` string).

    With ``chat_template=True`` the filled text becomes the user turn of
    ``tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True,
    **chat_template_kwargs)`` (e.g. ``enable_thinking=False``), after an optional system turn.
    Without a chat template, ``system_prompt`` (if any) is prepended on its own line.
    """
    text = _fill(template, question)
    if not chat_template:
        return text if system_prompt is None else f"{system_prompt}\n{text}"
    if tokenizer is None:
        raise ValueError("chat_template=True needs a tokenizer")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **chat_template_kwargs)
