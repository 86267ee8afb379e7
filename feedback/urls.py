from django.urls import path

from feedback.views import annotate, evaluation, exports, pages, quality, review, training

urlpatterns = [
    path("", pages.home, name="home"),
    path("projects/<slug:slug>/annotate/", annotate.annotate, name="annotate"),
    path("projects/<slug:slug>/annotate/next/", annotate.annotate_next, name="annotate-next"),
    path("projects/<slug:slug>/annotate/submit/", annotate.annotate_submit, name="annotate-submit"),
    path("projects/<slug:slug>/annotate/skip/", annotate.annotate_skip, name="annotate-skip"),
    path("projects/<slug:slug>/export/", exports.export_page, name="export"),
    path("projects/<slug:slug>/quality/", quality.quality_page, name="quality"),
    path(
        "projects/<slug:slug>/quality/annotators/<str:username>/exclusion/",
        quality.quality_annotator_exclusion,
        name="quality-annotator-exclusion",
    ),
    path("projects/<slug:slug>/review/", review.review_page, name="review"),
    path("projects/<slug:slug>/review/<str:item_key>/", review.review_item_page, name="review-item"),
    path("projects/<slug:slug>/review/<str:item_key>/verdict/", review.review_verdict, name="review-verdict"),
    path("projects/<slug:slug>/review/<str:item_key>/undo/", review.review_undo, name="review-undo"),
    path("projects/<slug:slug>/models/", evaluation.models_page, name="models"),
    path("projects/<slug:slug>/models/evaluate/", evaluation.models_evaluate, name="models-evaluate"),
    path("projects/<slug:slug>/training/", training.training_page, name="training"),
    path("projects/<slug:slug>/training/history/", training.training_history, name="training-history"),
    path("projects/<slug:slug>/training/watch/", training.training_watch, name="training-watch"),
    path("projects/<slug:slug>/training/retrain/", training.training_retrain, name="training-retrain"),
    path("projects/<slug:slug>/training/settings/", training.training_settings, name="training-settings"),
    path("projects/<slug:slug>/training/runs/<int:run_id>/", training.training_run_live, name="training-run-live"),
    path(
        "projects/<slug:slug>/training/runs/<int:run_id>/cancel/",
        training.training_run_cancel_view,
        name="training-run-cancel",
    ),
    path("projects/<slug:slug>/training/rounds/", training.training_rounds, name="training-rounds"),
    path("projects/<slug:slug>/training/rounds/new/", training.training_round_new, name="training-round-new"),
    path(
        "projects/<slug:slug>/training/versions/<int:version_id>/side-by-side/",
        training.training_side_by_side,
        name="training-side-by-side",
    ),
    path(
        "projects/<slug:slug>/training/versions/<int:version_id>/promote/",
        training.training_version_promote,
        name="training-version-promote",
    ),
]
