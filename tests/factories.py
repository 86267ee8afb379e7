"""factory_boy factories for the feedback models."""

import uuid

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from feedback import models
from feedback.rendering import markdown_to_safe_html


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ["username"]
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.PostGenerationMethodCall("set_password", "correct horse battery staple")

    @factory.post_generation
    def _save(obj, create, extracted, **kwargs):  # noqa: N805
        if create:
            obj.save()


class ProjectFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.Project

    name = factory.Sequence(lambda n: f"Project {n}")
    slug = factory.Sequence(lambda n: f"project-{n}")
    mode = models.Project.Mode.RANKING
    completions_per_prompt = 4


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.Membership

    user = factory.SubFactory(UserFactory)
    project = factory.SubFactory(ProjectFactory)
    role = models.Membership.Role.ANNOTATOR


class PromptFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.Prompt

    project = factory.SubFactory(ProjectFactory)
    messages = factory.Sequence(lambda n: [{"role": "user", "content": f"Question number {n}?"}])


def first_round(project: models.Project) -> models.Round:
    """The project's round 1, made on first use as a finished round (as the migration makes it)."""
    round_one, _ = models.Round.objects.get_or_create(
        project=project, number=1, defaults={"status": models.Round.Status.DONE, "writers": ["test-model"]}
    )
    return round_one


class RoundFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.Round

    project = factory.SubFactory(ProjectFactory)
    number = factory.LazyAttribute(lambda r: r.project.rounds.count() + 1)
    writers = factory.LazyFunction(lambda: ["base"])
    status = models.Round.Status.DONE


class CompletionFactory(factory.django.DjangoModelFactory):
    """A completion in round 1 of its prompt's project unless told otherwise; its prompt joins that round."""

    class Meta:
        model = models.Completion
        skip_postgeneration_save = True

    prompt = factory.SubFactory(PromptFactory)
    round = factory.LazyAttribute(lambda c: first_round(c.prompt.project))
    text = factory.Sequence(lambda n: f"Answer **{n}**.")
    html = factory.LazyAttribute(lambda c: markdown_to_safe_html(c.text))
    source_model = "test-model"

    @factory.post_generation
    def _in_round(obj, create, extracted, **kwargs):  # noqa: N805
        if create:
            models.RoundPrompt.objects.get_or_create(round=obj.round, prompt=obj.prompt)


class AssignmentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.Assignment

    project = factory.SelfAttribute("prompt.project")
    annotator = factory.SubFactory(UserFactory)
    prompt = factory.SubFactory(PromptFactory)
    round = factory.LazyAttribute(lambda a: first_round(a.prompt.project))
    item_key = factory.LazyAttribute(lambda a: f"p{a.prompt.pk}-r{a.round.pk}")
    slot = 0
    state = models.Assignment.State.LEASED
    annotator_slot = factory.LazyAttribute(lambda a: 0 if a.state == models.Assignment.State.LEASED else None)
    display_order = factory.LazyFunction(list)
    expires_at = factory.LazyFunction(lambda: timezone.now() + timezone.timedelta(minutes=10))


class PairwiseJudgementFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.PairwiseJudgement

    annotator = factory.SubFactory(UserFactory)
    prompt = factory.SubFactory(PromptFactory)
    project = factory.SelfAttribute("prompt.project")
    round = factory.LazyAttribute(lambda j: first_round(j.project))
    left = factory.SubFactory(
        CompletionFactory, prompt=factory.SelfAttribute("..prompt"), round=factory.SelfAttribute("..round")
    )
    right = factory.SubFactory(
        CompletionFactory, prompt=factory.SelfAttribute("..prompt"), round=factory.SelfAttribute("..round")
    )
    item_key = factory.LazyAttribute(lambda j: f"c{min(j.left.pk, j.right.pk)}-{max(j.left.pk, j.right.pk)}")
    choice = models.PairwiseJudgement.Choice.A
    client_uuid = factory.LazyFunction(uuid.uuid4)


class RankingJudgementFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.RankingJudgement

    annotator = factory.SubFactory(UserFactory)
    prompt = factory.SubFactory(PromptFactory)
    project = factory.SelfAttribute("prompt.project")
    round = factory.LazyAttribute(lambda j: first_round(j.project))
    client_uuid = factory.LazyFunction(uuid.uuid4)


class ModelVersionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.ModelVersion

    project = factory.SubFactory(ProjectFactory)
    name = factory.Sequence(lambda n: f"v{n}")
    weights_path = factory.LazyAttribute(lambda v: f"versions/{v.project.slug}/{v.name}")


class TrainingRunFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.TrainingRun

    project = factory.SubFactory(ProjectFactory)
    algorithm = models.TrainingRun.Algorithm.DPO
