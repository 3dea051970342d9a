"""The teacher of PACED distillation (arXiv 2603.11178; docs/algorithms/reference.md §7): a separate frozen model,
or the student itself reading a privileged prompt that holds the gold solution.

The teacher reads the student's completion tokens after its own prompt (the student's prompt, or
the privileged one) and returns its final hidden states at the positions that predict each
completion token, with its LM head; :func:`rltk.algos.chunked_kl.linear_kl` turns those into the
token-level full-vocabulary KL without building either model's logits. A separate teacher is placed
like the reference model (:func:`rltk.trainer.distributed.prepare_frozen`: sharded under ZeRO-3).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rltk.schema import ConfigError, ModelConfig, TeacherConfig
from rltk.data.loaders import Example
from rltk.engines.base import pad_left
from rltk.trainer.distributed import prepare_frozen, whole_shape
from rltk.trainer.logprobs import FinalHidden, TokenBatch


class Teacher:
    """Loaded once, frozen, in eval mode, placed by ``accelerator`` (after the student is prepared);
    ``None`` model = the privileged student."""

    def __init__(self, cfg: TeacherConfig, student_tokenizer, accelerator, answer_template: str):
        self.cfg = cfg
        self.tokenizer = student_tokenizer
        self.answer_template = answer_template
        self.model = None
        if cfg.name_or_path:
            self.model = prepare_frozen(_load_teacher(cfg, student_tokenizer), accelerator)

    def prompts(self, examples: Sequence[Example], prompts: Sequence[str]) -> list[str] | None:
        """The teacher's prompt text per example: the privileged one, or ``None`` (the student's)."""
        if not self.cfg.privileged:
            return None
        return [self.cfg.privileged_template.format(solution=self._solution(e), prompt=p)
                for e, p in zip(examples, prompts)]

    def _solution(self, example: Example) -> str:
        """The worked solution if the data has one, else the gold answer as the prompt asks for it."""
        return example.solution or self.answer_template.format(answer=example.answer)

    def tokens(self, tokens: TokenBatch, prompts: list[str] | None, group_size: int) -> TokenBatch:
        """The completions of ``tokens`` after the teacher's prompts (one per group), left-padded."""
        if prompts is None:
            return tokens
        encoded = [self.tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"] for p in prompts]
        rows = [ids for ids in encoded for _ in range(group_size)]
        ids = pad_left(rows, self.tokenizer.pad_token_id)
        mask = pad_left([torch.ones_like(r) for r in rows], 0)
        return TokenBatch(ids, mask.to(tokens.prompt_mask.dtype), tokens.completion_ids, tokens.completion_mask)

    @torch.no_grad()
    def hidden(self, student: torch.nn.Module, batch: TokenBatch) -> tuple[Tensor, Tensor]:
        """Final hidden states ``[N, T, H]`` predicting each completion token, and the LM-head
        weight ``[V, H]`` (the parameter itself: under ZeRO-3 a shard, see
        :func:`rltk.trainer.distributed.gathered`), of the teacher (``student`` itself, without
        gradient, when privileged). The whole model is called (a ZeRO-3 engine's hooks need that)
        with its LM head on the last position only; the decoder's output is taken by a hook, so no
        per-layer hidden states are kept. The forward runs on the rows' own widths (padding that
        every row has is cut), and the result is padded back to the batch's T with zeros."""
        width = batch.completion_ids.shape[1]
        batch = batch.trimmed()
        model = self.model if self.model is not None else student
        module = getattr(model, "module", model)  # a DeepSpeed engine wraps the teacher
        device = next(module.parameters()).device
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1).to(device)
        attention = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1).to(device)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        final = FinalHidden(module.get_decoder())
        with final:
            model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False,
                  logits_to_keep=1)
        start, length = batch.prompt_ids.shape[1] - 1, batch.completion_ids.shape[1]
        hidden = torch.nn.functional.pad(final.value[:, start : start + length], (0, 0, 0, width - length))
        return hidden, module.get_output_embeddings().weight


def _load_teacher(cfg: TeacherConfig, student_tokenizer):
    """A frozen eval-mode teacher whose vocabulary is the student's (PACED's KL is token-level)."""
    from rltk.models import load_model, load_tokenizer

    teacher_tokenizer = load_tokenizer(cfg.name_or_path, cfg.trust_remote_code)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ConfigError(f"teacher.name_or_path: '{cfg.name_or_path}' has a different vocabulary from the "
                          f"student ({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens); PACED's token-level "
                          "KL needs one tokenizer: pick a teacher of the same model family, or use "
                          "teacher.privileged: true")
    model_cfg = ModelConfig(name_or_path=cfg.name_or_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                            attn_implementation=cfg.attn_implementation)
    return load_model(cfg.name_or_path, model_cfg, trainable=False)


def shared_vocabulary(student_weight: Tensor, teacher_weight: Tensor, num_tokens: int) -> int:
    """Rows of both LM heads the KL runs over: the common leading rows, which must cover every token
    (Qwen2.5 heads are padded past the tokenizer differently by size: 151,936 vs 152,064 rows)."""
    student_rows, teacher_rows = whole_shape(student_weight)[0], whole_shape(teacher_weight)[0]
    rows = min(student_rows, teacher_rows)
    if rows < num_tokens:
        raise ConfigError(f"teacher.name_or_path: the LM heads have {student_rows} (student) and {teacher_rows} "
                          f"(teacher) rows, fewer than the tokenizer's {num_tokens} tokens")
    return rows
