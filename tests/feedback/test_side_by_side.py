"""Side-by-side answers after a run: written by the worker with the tiny model, shown to managers on the
training page and through the API, refused to everyone else."""

import json
import shutil

import pytest
from rest_framework.test import APIClient

from feedback.models import Membership, ModelVersion, Project, Prompt, TrainingRun
from feedback.services import training_runs
from feedback.services.generation import answers_sample
from feedback.services.model_versions import model_version_promote
from feedback.services.side_by_side import side_by_side_request, side_by_side_write
from feedback.services.training_runs import run_dir, training_run_execute, training_run_start
from tests.factories import MembershipFactory, ModelVersionFactory, ProjectFactory, PromptFactory, TrainingRunFactory
from tests.feedback.export_helpers import compare, make_prompt
from tests.feedback.test_training_runs import SMALL

# a large learning rate, so that the tiny model's 8-token answers change whatever prompts are held out
CONFIG = {**SMALL, "learning_rate": 1e-2}
HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def project(tiny_model_dir):
    project = ProjectFactory(
        slug="loop",
        name="Loop",
        mode=Project.Mode.PAIRWISE,
        completions_per_prompt=2,
        base_model=str(tiny_model_dir),
        max_new_tokens=8,
        temperature=0.8,
        top_p=0.95,
        training_config=CONFIG,
    )
    annotator = MembershipFactory(project=project).user
    for n in range(40):
        _, (good, bad) = make_prompt(project, k=2, text=f"Question {n}: tell me about cats")
        compare(annotator, good, bad, "a")
    return project


def held_out_prompt_ids(run: TrainingRun) -> list[int]:
    rows = (run_dir(run) / "held_out.jsonl").read_text().splitlines()
    return sorted({json.loads(row)["prompt_id"] for row in rows})


@pytest.mark.django_db(transaction=True)
def test_a_run_writes_the_parents_and_the_new_versions_answers_to_held_out_prompts(project, tiny_model_dir):
    run = training_run_start(project=project)  # huey immediate: the run, then its side-by-side task
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    version = run.produced_version
    side = version.metrics["side_by_side"]

    assert side["status"] == "done" and side["source"] == "held_out" and side["parent"] == "base"
    assert side["sampling"] == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 8, "seed": 0}
    held_out = held_out_prompt_ids(run)
    assert len(held_out) >= 2
    assert [pair["prompt_id"] for pair in side["pairs"]] == held_out[:5]
    prompts = [Prompt.objects.get(pk=pair["prompt_id"]) for pair in side["pairs"]]
    assert [pair["messages"] for pair in side["pairs"]] == [p.messages for p in prompts]
    # the same settings and seed give the same answers again, for each model
    again = dict(conversations=[p.messages for p in prompts], **side["sampling"])
    base = answers_sample(model=str(tiny_model_dir), **again)
    trained = answers_sample(model=str(training_runs.settings.MODEL_VERSIONS_DIR / version.weights_path), **again)
    assert [(pair["parent_text"], pair["parent_truncated"]) for pair in side["pairs"]] == base
    assert [(pair["candidate_text"], pair["candidate_truncated"]) for pair in side["pairs"]] == trained
    assert base != trained  # the run changed what the model writes
    assert side_by_side_write(version_id=version.pk) == side  # a worker taking the task again keeps them
    # the other figures of the run are still there
    assert "eval_before" in version.metrics and "eval_after" in version.metrics


@pytest.mark.django_db(transaction=True)
def test_evaluation_prompts_come_first_and_a_second_version_is_compared_with_its_parent(project):
    evaluation = [
        PromptFactory(project=project, split=Prompt.Split.EVAL, messages=[{"role": "user", "content": f"Eval {n}?"}])
        for n in range(7)
    ]
    first = training_run_start(project=project)
    first.refresh_from_db()
    v1 = first.produced_version
    model_version_promote(version=v1, generate=False)
    second = training_run_start(project=project)
    second.refresh_from_db()
    side = second.produced_version.metrics["side_by_side"]
    assert side["status"] == "done" and side["source"] == "eval" and side["parent"] == "v1"
    assert [pair["prompt_id"] for pair in side["pairs"]] == [p.pk for p in evaluation[:5]]


@pytest.mark.django_db(transaction=True)
def test_it_is_queued_when_the_run_finishes_and_a_failure_leaves_the_run_succeeded(project, queue, client):
    run = training_run_start(project=project)
    [(run_id,)] = queue.args("training_run_task")
    training_run_execute(run_id=run_id)
    run.refresh_from_db()
    version = run.produced_version
    assert queue.args("side_by_side_task") == [(version.pk,)]
    assert version.metrics["side_by_side"] == {"status": "queued"}

    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER).user
    client.force_login(manager)
    page = client.get(f"/projects/loop/training/?run={run.pk}").content.decode()
    assert "Writing both models' answers to a few held-out prompts" in page
    poll = f'hx-get="/projects/loop/training/versions/{version.pk}/side-by-side/" hx-trigger="every 2s"'
    assert poll in page

    shutil.rmtree(training_runs.settings.MODEL_VERSIONS_DIR / version.weights_path)  # its weights are gone
    entry = side_by_side_write(version_id=version.pk)
    assert entry["status"] == "failed"
    assert "does not exist" in entry["error"] and version.weights_path in entry["error"]
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.SUCCEEDED
    fragment = client.get(f"/projects/loop/training/versions/{version.pk}/side-by-side/", **HTMX).content.decode()
    assert "The side-by-side answers could not be written:" in fragment and "does not exist" in fragment
    assert "every 2s" not in fragment  # nothing more to wait for


@pytest.mark.django_db
def test_a_reward_model_gets_none(queue):
    version = ModelVersionFactory(kind=ModelVersion.Kind.REWARD, name="reward-1")
    side_by_side_request(version=version)
    version.refresh_from_db()
    assert "side_by_side" not in version.metrics and queue.sent == []


# What the page and the API show, from a stored entry.

STORED = {
    "status": "done",
    "parent": "v1",
    "source": "eval",
    "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64, "seed": 0},
    "pairs": [
        {
            "prompt_id": 1,
            "messages": [{"role": "user", "content": "Say <b>hi</b>"}],
            "parent_text": "Hello there, **friend**.",
            "parent_truncated": False,
            "candidate_text": 'Hi<script>alert(1)</script><img src=x onerror="alert(2)">',
            "candidate_truncated": True,
        }
    ],
}


@pytest.fixture
def shown(db):
    project = ProjectFactory(slug="shown", name="Shown", mode=Project.Mode.PAIRWISE)
    parent = ModelVersionFactory(project=project, name="v1")
    run = TrainingRunFactory(project=project, status=TrainingRun.Status.SUCCEEDED)
    version = ModelVersionFactory(
        project=project, name="v2", parent=parent, produced_by_run=run, metrics={"side_by_side": STORED}
    )
    manager = MembershipFactory(project=project, role=Membership.Role.MANAGER).user
    annotator = MembershipFactory(project=project, role=Membership.Role.ANNOTATOR).user
    return {"project": project, "run": run, "version": version, "manager": manager, "annotator": annotator}


def test_managers_see_the_pairs_on_the_training_page_rendered_safely(shown, client):
    client.force_login(shown["manager"])
    page = client.get(f"/projects/shown/training/?run={shown['run'].pk}").content.decode()
    assert "v1 and v2 side by side" in page
    assert "1 evaluation prompt, answered by both with the same settings: temperature 0.7, top-p 0.9" in page
    assert "Hello there, <strong>friend</strong>." in page
    # the model's markup is shown as text, never as elements
    assert "<p>Hi&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=" in page
    assert "<script>alert" not in page and "<img" not in page
    assert "Say &lt;b&gt;hi&lt;/b&gt;" in page  # the prompt is text
    assert "cut at 64 tokens" in page
    assert 'hx-trigger="every 2s"' not in page  # done: nothing polls


def test_annotators_see_the_training_page_without_the_pairs_and_cannot_fetch_them(shown, client):
    client.force_login(shown["annotator"])
    page = client.get(f"/projects/shown/training/?run={shown['run'].pk}").content.decode()
    assert "side by side" not in page and "Hello there" not in page
    version = shown["version"]
    assert client.get(f"/projects/shown/training/versions/{version.pk}/side-by-side/").status_code == 403


def test_the_fragment_refuses_unknown_versions_and_other_projects_versions(shown, client):
    client.force_login(shown["manager"])
    other = ModelVersionFactory(project=ProjectFactory(slug="other"), metrics={"side_by_side": STORED})
    assert client.get(f"/projects/shown/training/versions/{other.pk}/side-by-side/").status_code == 404
    assert client.get("/projects/shown/training/versions/999999/side-by-side/").status_code == 404
    bare = ModelVersionFactory(project=shown["project"], name="v3")  # recorded before runs wrote side-by-sides
    assert client.get(f"/projects/shown/training/versions/{bare.pk}/side-by-side/").status_code == 404
    ok = client.get(f"/projects/shown/training/versions/{shown['version'].pk}/side-by-side/", **HTMX)
    assert ok.status_code == 200 and "Hello there, <strong>friend</strong>." in ok.content.decode()


def test_the_api_gives_managers_the_pairs(shown):
    api = APIClient()
    api.force_authenticate(shown["manager"])
    response = api.get("/api/v1/projects/shown/model-versions/v2/side-by-side/")
    assert response.status_code == 200
    body = response.json()
    assert {key: body[key] for key in ("version", "parent_name", "status", "error", "prompts_from")} == {
        "version": "v2",
        "parent_name": "v1",
        "status": "done",
        "error": "",
        "prompts_from": "eval",
    }
    assert body["sampling"] == STORED["sampling"]
    [pair] = body["pairs"]
    assert pair["parent_text"] == "Hello there, **friend**."
    assert pair["parent_html"] == "<p>Hello there, <strong>friend</strong>.</p>\n"
    assert pair["candidate_text"] == STORED["pairs"][0]["candidate_text"]
    assert pair["candidate_html"].startswith("<p>Hi&lt;script&gt;alert(1)&lt;/script&gt;&lt;img")
    assert "<script" not in pair["candidate_html"] and "<img" not in pair["candidate_html"]
    assert pair["candidate_truncated"] is True and pair["messages"] == STORED["pairs"][0]["messages"]


@pytest.mark.parametrize(
    ("who", "path", "status", "detail"),
    [
        ("manager", "/api/v1/projects/shown/model-versions/v9/side-by-side/", 404, "shown has no version named 'v9'."),
        ("manager", "/api/v1/projects/shown/model-versions/x%00/side-by-side/", 404, "shown has no version named"),
        ("manager", "/api/v1/projects/shown/model-versions/v7/side-by-side/", 404, "shown has no version named 'v7'."),
        ("manager", "/api/v1/projects/other/model-versions/v7/side-by-side/", 404, "No such project."),
        ("manager", "/api/v1/projects/shown/model-versions/reward-1/side-by-side/", 404, "it is a reward model"),
        ("annotator", "/api/v1/projects/shown/model-versions/v2/side-by-side/", 403, "managers"),
    ],
)
def test_the_api_refuses_clearly(shown, who, path, status, detail):
    ModelVersionFactory(project=ProjectFactory(slug="other"), name="v7", metrics={"side_by_side": STORED})
    ModelVersionFactory(project=shown["project"], name="reward-1", kind=ModelVersion.Kind.REWARD)
    api = APIClient()
    api.force_authenticate(shown[who])
    response = api.get(path)
    assert response.status_code == status and detail in response.json()["detail"]


def test_another_projects_manager_is_told_it_does_not_exist(shown):
    stranger = MembershipFactory(project=ProjectFactory(slug="theirs"), role=Membership.Role.MANAGER).user
    api = APIClient()
    api.force_authenticate(stranger)
    assert api.get("/api/v1/projects/shown/model-versions/v2/side-by-side/").status_code == 404
