"""Swagger UI for the API schema, served from vendored assets (no CDN, no inline script)."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


def api_docs(request: HttpRequest) -> HttpResponse:
    return render(request, "api_docs.html")
