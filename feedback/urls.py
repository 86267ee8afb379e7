from django.urls import path

from feedback.views import pages

urlpatterns = [
    path("", pages.home, name="home"),
]
