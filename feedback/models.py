"""Rankwise's data: projects, prompts and completions, leases, human judgements, models and runs.

Invariants are kept by database constraints so they hold under concurrent writers, not
only when a form checked them first.
"""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

COMPLETIONS_PER_PROMPT_MAX = 16  # the largest K a project may have
# The task on an annotator's screen and the one prefetched behind it.
LEASES_PER_ANNOTATOR = 2


class Project(models.Model):
    class Mode(models.TextChoices):
        PAIRWISE = "pairwise", "Pairwise comparison"
        RANKING = "ranking", "Group ranking"

    class Algorithm(models.TextChoices):
        DPO = "dpo", "DPO on pairwise judgements"
        GRPO = "grpo", "GRPO on ranked groups"
        DPO_FROM_RANKINGS = "dpo_rankings", "DPO on pairs derived from rankings"
        REWARD = "reward", "Reward model from the judgements"
        GRPO_ONLINE = "grpo_online", "GRPO (online, reward model)"
        PPO = "ppo", "PPO (reward model)"

    class Weighting(models.TextChoices):
        RELIABILITY = "reliability", "By annotator reliability"
        RAW = "raw", "One vote each"

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    guidelines = models.TextField(blank=True, help_text="Markdown shown to annotators.")
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.RANKING)
    completions_per_prompt = models.PositiveSmallIntegerField(
        default=4, validators=[MinValueValidator(2), MaxValueValidator(COMPLETIONS_PER_PROMPT_MAX)], help_text="K"
    )
    overlap = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(20)],
        help_text="Judgements wanted per item.",
    )
    lease_seconds = models.PositiveIntegerField(default=600, validators=[MinValueValidator(30)])
    temperature = models.FloatField(default=0.8, validators=[MinValueValidator(0.0), MaxValueValidator(2.0)])
    top_p = models.FloatField(default=0.95, validators=[MinValueValidator(0.01), MaxValueValidator(1.0)])
    max_new_tokens = models.PositiveIntegerField(default=256, validators=[MinValueValidator(1)])
    base_model = models.CharField(
        max_length=500,
        blank=True,
        help_text="A Hugging Face model directory or id; empty for the default model.",
    )
    training_algorithm = models.CharField(max_length=16, choices=Algorithm.choices, default=Algorithm.DPO)
    training_config = models.JSONField(default=dict, blank=True, help_text="Hyperparameters for training runs.")
    weighting = models.CharField(
        max_length=16,
        choices=Weighting.choices,
        default=Weighting.RELIABILITY,
        help_text="What an annotator's vote counts when a training run labels its pairs: their reliability "
        "(from gold items and agreement) or one each.",
    )
    auto_train = models.BooleanField(default=False)
    auto_train_threshold = models.PositiveIntegerField(default=200, validators=[MinValueValidator(1)])
    auto_promote = models.BooleanField(default=False)
    round_size = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Prompts in the round a promotion starts; empty for all prompts.",
    )
    eval_prompt_share = models.FloatField(
        default=0.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Share (0 to 1) of newly imported prompts that become evaluation prompts when a record "
        "does not say its split; drawn from a hash of the prompt's messages.",
    )
    battle_share = models.FloatField(
        default=0.2,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Share (0 to 1) of an annotator's tasks that are blind battles between model versions while "
        "a battle wants judgements; 0 serves none.",
    )
    gold_share = models.FloatField(
        default=0.1,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Share (0 to 1) of an annotator's tasks that are gold items (prompts with a known answer), "
        "while any are left for them; 0 serves none.",
    )
    gold_feedback = models.BooleanField(
        default=False, help_text="After a wrong answer on a gold item, the annotator is shown the expected one."
    )
    promote_when_preferred = models.BooleanField(
        default=False,
        help_text="A finished run's version is put in blind battles against the active version and promoted "
        "only when people prefer it (a sequential test); instead of auto-promote's rule.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="Membership", related_name="projects")

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(mode__in=["pairwise", "ranking"]), name="project_mode_valid"),
            models.CheckConstraint(condition=Q(completions_per_prompt__gte=2), name="project_k_at_least_2"),
            models.CheckConstraint(condition=Q(overlap__gte=1), name="project_overlap_at_least_1"),
            models.CheckConstraint(condition=Q(top_p__gt=0, top_p__lte=1), name="project_top_p_range"),
            models.CheckConstraint(condition=Q(temperature__gte=0), name="project_temperature_non_negative"),
            models.CheckConstraint(
                condition=Q(eval_prompt_share__gte=0, eval_prompt_share__lte=1), name="project_eval_prompt_share_range"
            ),
            models.CheckConstraint(
                condition=Q(battle_share__gte=0, battle_share__lte=1), name="project_battle_share_range"
            ),
            models.CheckConstraint(condition=Q(gold_share__gte=0, gold_share__lte=1), name="project_gold_share_range"),
            models.CheckConstraint(condition=Q(weighting__in=["reliability", "raw"]), name="project_weighting_valid"),
        ]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    class Role(models.TextChoices):
        ANNOTATOR = "annotator"
        REVIEWER = "reviewer"
        MANAGER = "manager"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.ANNOTATOR)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "project"], name="one_membership_per_user_project"),
            models.CheckConstraint(
                condition=Q(role__in=["annotator", "reviewer", "manager"]), name="membership_role_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.project} as {self.role}"


class AnnotatorExclusion(models.Model):
    """An annotator whose judgements the project leaves out of exports, training snapshots and battles.

    Their judgements stay stored; including the annotator again (deleting this row) brings them back.
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="exclusions")
    annotator = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    excluded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "annotator"], name="one_exclusion_per_project_annotator"),
        ]

    def __str__(self) -> str:
        return f"{self.annotator} left out of {self.project}"


class Prompt(models.Model):
    class Split(models.TextChoices):
        TRAIN = "train", "Training"
        EVAL = "eval", "Evaluation"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="prompts")
    messages = models.JSONField(help_text="[{role, content}, ...] ending with a user turn.")
    external_id = models.CharField(max_length=200, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    split = models.CharField(
        max_length=8,
        choices=Split.choices,
        default=Split.TRAIN,
        help_text="An evaluation prompt never reaches training data, training exports or ordinary rounds.",
    )
    gold = models.JSONField(
        null=True,
        blank=True,
        help_text='The known answer: {"choice": "a"|"b"} for two completions, or {"ranking": [[0], [1, 2], [3]]} '
        "(groups of completion indices, best first) over the completions the prompt was imported with.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(condition=Q(split__in=["train", "eval"]), name="prompt_split_valid"),
            models.UniqueConstraint(
                fields=["project", "external_id"],
                condition=~Q(external_id=""),
                name="unique_prompt_external_id",
            ),
        ]
        # the task queue asks on every next-task whether a project has gold items: a few rows, not its prompts
        indexes = [models.Index(fields=["project"], condition=Q(gold__isnull=False), name="prompt_gold")]

    def __str__(self) -> str:
        text = self.messages[-1]["content"] if self.messages else ""
        return text[:80]


class ModelVersion(models.Model):
    class Kind(models.TextChoices):
        POLICY = "policy", "Policy (writes completions)"
        REWARD = "reward", "Reward model (scores completions)"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="model_versions")
    name = models.CharField(max_length=100)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children")
    weights_path = models.CharField(max_length=500, help_text="A model directory under the data dir.")
    produced_by_run = models.OneToOneField(
        "TrainingRun", null=True, blank=True, on_delete=models.SET_NULL, related_name="produced_version"
    )
    metrics = models.JSONField(default=dict, blank=True)
    kind = models.CharField(
        max_length=8,
        choices=Kind.choices,
        default=Kind.POLICY,
        help_text="A reward model scores completions for PPO and online GRPO; it is never promoted.",
    )
    is_active = models.BooleanField(default=False)
    gate = models.JSONField(
        default=dict,
        blank=True,
        help_text="The promotion gate's decision on this version: promote, reject or wait, against which "
        "version, with the battles and the test's figures, and when.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["project", "name"], name="unique_model_version_name"),
            models.UniqueConstraint(
                fields=["project"], condition=Q(is_active=True), name="one_active_version_per_project"
            ),
            models.CheckConstraint(condition=Q(kind__in=["policy", "reward"]), name="model_version_kind_valid"),
            models.CheckConstraint(
                condition=Q(kind="policy") | Q(is_active=False), name="model_version_reward_never_active"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.project.slug}/{self.name}"


class Round(models.Model):
    """A set of fresh completions for chosen prompts of a project, written by named writers.

    ``writers`` names model versions of the project, ``base`` for the project's base model, or (for a round
    of imported completions) the models the import named. The round's prompts are chosen when it starts
    (``RoundPrompt`` rows) and each gets K completions, so a worker that dies mid-round resumes from what
    it committed. A battle round has two writers and the project's evaluation prompts: one completion from
    each writer per prompt, judged blind as a pair whatever the project's mode, never trained on.
    """

    class Strategy(models.TextChoices):
        OLDEST_ROUND_FIRST = "oldest_round_first", "Prompts whose latest round is oldest first"
        UNJUDGED_FIRST = "unjudged_first", "Prompts with the fewest judgements first"
        UNCERTAIN_FIRST = "uncertain_first", "Prompts the active version is least sure of first"
        IMPORTED = "imported", "Completions that came with imported prompts"
        EVALUATION = "evaluation", "Evaluation prompts, for a battle"

    class Kind(models.TextChoices):
        TRAINING = "training", "Completions to judge and train on"
        BATTLE = "battle", "A blind battle between two writers on evaluation prompts"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="rounds")
    number = models.PositiveIntegerField(help_text="1, 2, ... within the project.")
    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.TRAINING)
    writers = models.JSONField(default=list, help_text="Version names, or 'base', that write its completions.")
    strategy = models.CharField(max_length=20, choices=Strategy.choices, default=Strategy.OLDEST_ROUND_FIRST)
    prompt_limit = models.PositiveIntegerField(null=True, blank=True, help_text="N; empty for all prompts.")
    sampling = models.JSONField(default=dict, blank=True, help_text="k, temperature, top_p, max_new_tokens.")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.QUEUED)
    error = models.TextField(blank=True)
    prompt_ids = models.JSONField(default=list, blank=True, help_text="The prompts chosen when it started, in order.")
    prompts_total = models.PositiveIntegerField(default=0, help_text="Prompts chosen when it started.")
    prompts_written = models.PositiveIntegerField(default=0, help_text="Chosen prompts that have their completions.")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(fields=["project", "number"], name="unique_round_number_per_project"),
            models.UniqueConstraint(
                fields=["project"], condition=Q(status__in=["queued", "running"]), name="one_open_round_per_project"
            ),
            models.CheckConstraint(
                condition=Q(status__in=["queued", "running", "done", "failed"]), name="round_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(
                    strategy__in=["oldest_round_first", "unjudged_first", "uncertain_first", "imported", "evaluation"]
                ),
                name="round_strategy_valid",
            ),
            models.CheckConstraint(condition=Q(kind__in=["training", "battle"]), name="round_kind_valid"),
            models.CheckConstraint(
                condition=Q(kind="training") | Q(strategy="evaluation"), name="round_battle_on_evaluation_prompts"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.project.slug} round {self.number}"


class RoundPrompt(models.Model):
    """A prompt chosen for a round: its items are the round's completions of that prompt.

    ``judgement_count`` is kept by judgement_submit so the task queue can serve the least-judged
    items first through the (round, judgement_count, id) index without counting on every request.
    """

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="round_prompts")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="round_prompts")
    judgement_count = models.PositiveIntegerField(default=0, editable=False)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["round", "judgement_count", "id"], name="round_prompt_queue_order")]
        constraints = [
            models.UniqueConstraint(fields=["round", "prompt"], name="one_round_prompt_per_round_prompt"),
        ]

    def __str__(self) -> str:
        return f"prompt {self.prompt_id} in round {self.round_id}"


class Completion(models.Model):
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="completions")
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="completions")
    text = models.TextField()
    html = models.TextField(help_text="Sanitized HTML rendered from the text when the completion was created.")
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="completions"
    )
    source_model = models.CharField(
        max_length=300,
        blank=True,
        help_text="The model that wrote it when not a version of ours, or 'human'.",
    )
    generation_params = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["round", "prompt", "id"], name="completion_round_prompt")]

    def __str__(self) -> str:
        return self.text[:80]

    @property
    def source(self) -> str:
        return str(self.model_version) if self.model_version_id else self.source_model


class CompletionScore(models.Model):
    """A reward model's score of one completion, computed in the worker (the web process never loads a model)."""

    completion = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="scores")
    reward_model = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="scores")
    score = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["completion", "reward_model"], name="one_score_per_completion_reward_model")
        ]

    def __str__(self) -> str:
        return f"{self.reward_model}: {self.score:.3f} for completion {self.completion_id}"


class Assignment(models.Model):
    """A lease of one item to one annotator.

    An item is one round's completions of a prompt (ranking mode) or an unordered pair of them
    (pairwise mode), named by ``item_key``. Each item has ``overlap`` slots; a live lease or a finished
    judgement holds one, so the unique (item_key, slot) constraint caps judgements per item
    at the overlap whatever the concurrency. Expired leases are deleted to free their slot;
    a skip keeps the row (the item is never served to that annotator again) but drops the slot.

    An annotator holds at most ``LEASES_PER_ANNOTATOR`` unfinished leases per project (the task
    on screen and the one prefetched behind it): each takes one of their ``annotator_slot``
    places under a unique constraint, and gives it back when judged or skipped. A constraint
    rather than a count read before the insert, so it holds for concurrent requests on SQLite
    and PostgreSQL alike.
    """

    class State(models.TextChoices):
        LEASED = "leased"
        DONE = "done"
        SKIPPED = "skipped"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="assignments")
    annotator = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="assignments")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="assignments")
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="assignments")
    completion_a = models.ForeignKey(Completion, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    completion_b = models.ForeignKey(Completion, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    item_key = models.CharField(max_length=64, help_text="'p<prompt id>-r<round id>' or 'c<low id>-<high id>'.")
    slot = models.PositiveSmallIntegerField(null=True, blank=True)
    annotator_slot = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Which of the annotator's lease places it holds while unfinished."
    )
    display_order = models.JSONField(help_text="Completion ids in the order shown.")
    state = models.CharField(max_length=8, choices=State.choices, default=State.LEASED)
    skip_reason = models.CharField(max_length=500, blank=True)
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["item_key", "slot"], name="one_lease_per_item_slot"),
            models.UniqueConstraint(fields=["annotator", "item_key"], name="one_assignment_per_annotator_item"),
            models.CheckConstraint(condition=Q(state__in=["leased", "done", "skipped"]), name="assignment_state_valid"),
            models.CheckConstraint(
                condition=Q(state="skipped", slot__isnull=True) | (~Q(state="skipped") & Q(slot__isnull=False)),
                name="assignment_slot_held_unless_skipped",
            ),
            models.UniqueConstraint(
                fields=["project", "annotator", "annotator_slot"], name="at_most_two_leases_per_annotator_project"
            ),
            models.CheckConstraint(
                # a NULL place must fail the first branch explicitly: NULL IN (...) is unknown, which a CHECK lets pass
                condition=Q(
                    state="leased", annotator_slot__isnull=False, annotator_slot__in=list(range(LEASES_PER_ANNOTATOR))
                )
                | (~Q(state="leased") & Q(annotator_slot__isnull=True)),
                name="assignment_annotator_slot_held_while_leased",
            ),
        ]
        indexes = [
            models.Index(fields=["project", "state", "expires_at"]),
            models.Index(fields=["annotator", "project", "state"], name="assignment_annotator_state"),
            # the queue's count of an annotator's gold and battle tasks reads this index alone
            models.Index(fields=["project", "annotator", "prompt", "round"], name="assignment_annotator_items"),
        ]

    def __str__(self) -> str:
        return f"{self.item_key} to {self.annotator} ({self.state})"


class Judgement(models.Model):
    """What every human judgement records, whatever its kind: who judged which lease of which round's prompt, and how.

    A field every kind of judgement has belongs here, once; the concrete kinds add what they judged.
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="%(class)ss")
    annotator = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    assignment = models.OneToOneField(Assignment, null=True, on_delete=models.SET_NULL, related_name="%(class)s")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="%(class)ss")
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="%(class)ss")
    rationale = models.TextField(blank=True)
    time_ms = models.PositiveIntegerField(null=True, blank=True)
    client_uuid = models.UUIDField(unique=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        abstract = True
        ordering = ["id"]


class PairwiseJudgement(Judgement):
    class Choice(models.TextChoices):
        A = "a", "A is better"
        B = "b", "B is better"
        TIE = "tie", "Tie"
        BOTH_BAD = "both_bad", "Both bad"

    class Strength(models.TextChoices):
        SLIGHT = "slight"
        CLEAR = "clear"

    left = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="+", help_text="Shown as A.")
    right = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="+", help_text="Shown as B.")
    item_key = models.CharField(max_length=64)
    choice = models.CharField(max_length=8, choices=Choice.choices)
    strength = models.CharField(max_length=8, choices=Strength.choices, blank=True)

    class Meta(Judgement.Meta):
        constraints = [
            models.UniqueConstraint(fields=["annotator", "item_key"], name="one_pairwise_judgement_per_annotator_item"),
            models.CheckConstraint(condition=Q(choice__in=["a", "b", "tie", "both_bad"]), name="pairwise_choice_valid"),
            models.CheckConstraint(condition=Q(strength__in=["", "slight", "clear"]), name="pairwise_strength_valid"),
            models.CheckConstraint(condition=~Q(left=models.F("right")), name="pairwise_two_different_completions"),
        ]

    def __str__(self) -> str:
        return f"{self.annotator}: {self.choice} on {self.item_key}"


class RankingJudgement(Judgement):
    class Meta(Judgement.Meta):
        constraints = [
            models.UniqueConstraint(
                fields=["annotator", "prompt", "round"], name="one_ranking_judgement_per_annotator_prompt_round"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.annotator}: ranking of prompt {self.prompt_id}"


class RankedCompletion(models.Model):
    judgement = models.ForeignKey(RankingJudgement, on_delete=models.CASCADE, related_name="ranked")
    completion = models.ForeignKey(Completion, on_delete=models.CASCADE, related_name="+")
    rank = models.PositiveSmallIntegerField(help_text="1 = best; tied completions share a rank.")
    position = models.PositiveSmallIntegerField(help_text="Where it was shown, 0 = first.")

    class Meta:
        ordering = ["judgement_id", "rank", "position"]
        constraints = [
            models.UniqueConstraint(fields=["judgement", "completion"], name="one_rank_per_completion_per_judgement"),
            models.CheckConstraint(condition=Q(rank__gte=1), name="rank_at_least_1"),
        ]

    def __str__(self) -> str:
        return f"#{self.rank}: {self.completion_id}"


class Adjudication(models.Model):
    """A reviewer's final verdict on an item, which replaces the annotators' votes in exports and training snapshots.

    The item is the one the annotators judged, named by the same ``item_key`` as their leases: an unordered pair
    of completions (pairwise mode) or one round's completions of a prompt (ranking mode). A pairwise verdict
    names the item's completions by id order: ``a`` is the lower id. A ranking verdict holds ``ranks``
    ({completion id: rank}, 1 = best, ties share a rank) over every completion of the item. ``unusable`` keeps
    the item out of training altogether. The annotators' judgements are never changed: undoing a verdict sets
    ``undone_at`` and the votes count again. At most one verdict per item is in force.
    """

    class Verdict(models.TextChoices):
        A = "a", "The first completion (lower id) is better"
        B = "b", "The second completion is better"
        TIE = "tie", "Tie"
        BOTH_BAD = "both_bad", "Both bad"
        RANKING = "ranking", "A ranking"
        UNUSABLE = "unusable", "Unusable"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="adjudications")
    prompt = models.ForeignKey(Prompt, on_delete=models.CASCADE, related_name="adjudications")
    item_key = models.CharField(max_length=64, help_text="'p<prompt id>-r<round id>' or 'c<low id>-<high id>'.")
    verdict = models.CharField(max_length=8, choices=Verdict.choices)
    ranks = models.JSONField(
        null=True, blank=True, help_text="Ranking verdicts: {completion id (a JSON string key): rank}."
    )
    note = models.TextField(blank=True)
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    undone_at = models.DateTimeField(null=True, blank=True)
    undone_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["item_key"], condition=Q(undone_at__isnull=True), name="one_verdict_in_force_per_item"
            ),
            models.CheckConstraint(
                condition=Q(verdict__in=["a", "b", "tie", "both_bad", "ranking", "unusable"]),
                name="adjudication_verdict_valid",
            ),
            models.CheckConstraint(
                condition=Q(verdict="ranking", ranks__isnull=False) | (~Q(verdict="ranking") & Q(ranks__isnull=True)),
                name="adjudication_ranks_iff_ranking",
            ),
        ]
        indexes = [models.Index(fields=["project", "undone_at"], name="adjudication_project_in_force")]

    def __str__(self) -> str:
        return f"{self.verdict} on {self.item_key} by {self.reviewer}"


class TrainingRun(models.Model):
    class Algorithm(models.TextChoices):
        DPO = "dpo"
        GRPO = "grpo"
        REWARD = "reward"
        PPO = "ppo"
        GRPO_ONLINE = "grpo_online"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Trigger(models.TextChoices):
        MANUAL = "manual", "Retrain now"
        SCHEDULE = "schedule", "Schedule"
        COMMAND = "command", "Command line"
        API = "api", "API"
        ADMIN = "admin", "Django admin"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="training_runs")
    algorithm = models.CharField(max_length=16, choices=Algorithm.choices)
    config = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(default=list, blank=True, help_text="[{step, loss, ...}, ...] as the run goes.")
    error = models.TextField(blank=True)
    data_counts = models.JSONField(default=dict, blank=True)
    data_hash = models.CharField(max_length=64, blank=True)
    parent_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="child_runs"
    )
    triggered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    trigger = models.CharField(max_length=10, choices=Trigger.choices, default=Trigger.MANUAL)
    cancel_requested = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["project"],
                condition=Q(status__in=["queued", "running"]),
                name="one_active_run_per_project",
            ),
            models.CheckConstraint(
                condition=Q(status__in=["queued", "running", "succeeded", "failed", "cancelled"]),
                name="training_run_status_valid",
            ),
            models.CheckConstraint(
                condition=Q(algorithm__in=["dpo", "grpo", "reward", "ppo", "grpo_online"]),
                name="training_run_algorithm_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.project.slug} run {self.pk} ({self.status})"
