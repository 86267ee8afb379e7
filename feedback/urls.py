from django.urls import path

from feedback.views import annotate, exports, pages

urlpatterns = [
    path("", pages.home, name="home"),
    path("projects/<slug:slug>/annotate/", annotate.annotate, name="annotate"),
    path("projects/<slug:slug>/annotate/next/", annotate.annotate_next, name="annotate-next"),
    path("projects/<slug:slug>/annotate/submit/", annotate.annotate_submit, name="annotate-submit"),
    path("projects/<slug:slug>/annotate/skip/", annotate.annotate_skip, name="annotate-skip"),
    path("projects/<slug:slug>/export/", exports.export_page, name="export"),
]
