"""Hand-made judgements for the export tests."""

from django.db import connection

from feedback.models import Completion, Prompt, RankedCompletion, RankingJudgement
from tests.factories import (
    CompletionFactory,
    PairwiseJudgementFactory,
    PromptFactory,
    RankingJudgementFactory,
    first_round,
)


def make_prompt(project, k: int = 4, text: str | None = None) -> tuple[Prompt, list[Completion]]:
    kwargs = {"messages": [{"role": "user", "content": text}]} if text else {}
    prompt = PromptFactory(project=project, **kwargs)
    return prompt, [CompletionFactory(prompt=prompt, text=f"answer {i} to {prompt.pk}") for i in range(k)]


def rank(annotator, prompt: Prompt, levels: list[list[Completion]], **kwargs) -> RankingJudgement:
    """A ranking judgement: levels[0] best; completions in one level are tied."""
    judgement = RankingJudgementFactory(annotator=annotator, prompt=prompt, **kwargs)
    position = 0
    for rank_value, level in enumerate(levels, start=1):
        for completion in level:
            RankedCompletion.objects.create(
                judgement=judgement, completion=completion, rank=rank_value, position=position
            )
            position += 1
    return judgement


def compare(annotator, left: Completion, right: Completion, choice: str, **kwargs):
    return PairwiseJudgementFactory(
        annotator=annotator, prompt=left.prompt, left=left, right=right, choice=choice, **kwargs
    )


def fast_password_hashing(settings) -> None:
    """Factories set passwords; the default hasher takes a good part of a second per user."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def bulk_rankings(project, *, prompts: int, k: int = 4, annotators=(), start: int = 0) -> None:
    """Many prompts, each with k completions ranked best-first by every annotator, written in bulk."""
    import uuid

    round_one = first_round(project)
    new_prompts = Prompt.objects.bulk_create(
        [
            Prompt(project=project, messages=[{"role": "user", "content": f"Bulk question {start + i}?"}])
            for i in range(prompts)
        ],
        batch_size=2000,
    )
    completions = Completion.objects.bulk_create(
        [
            Completion(
                prompt=p, round=round_one, text=f"Answer {j} to bulk question {p.pk}, somewhat long " * 3, html=""
            )
            for p in new_prompts
            for j in range(k)
        ],
        batch_size=2000,
    )
    judgements = RankingJudgement.objects.bulk_create(
        [
            RankingJudgement(project=project, annotator=annotator, prompt=p, round=round_one, client_uuid=uuid.uuid4())
            for p in new_prompts
            for annotator in annotators
        ],
        batch_size=2000,
    )
    by_prompt: dict[int, list[Completion]] = {}
    for completion in completions:
        by_prompt.setdefault(completion.prompt_id, []).append(completion)
    RankedCompletion.objects.bulk_create(
        [
            RankedCompletion(judgement=j, completion=c, rank=position + 1, position=position)
            for j in judgements
            for position, c in enumerate(by_prompt[j.prompt_id])
        ],
        batch_size=2000,
    )
    if connection.vendor == "postgresql":
        # The suite empties tables between tests (TRUNCATE), which leaves PostgreSQL's statistics saying they are
        # empty: the planner then loops over whole tables per row. A deployment's autovacuum analyses a table
        # within a minute of a bulk load; this does it at once.
        with connection.cursor() as cursor:
            tables = [model._meta.db_table for model in (Prompt, Completion, RankingJudgement, RankedCompletion)]
            cursor.execute(f"ANALYZE {', '.join(tables)}")
