from __future__ import annotations

from django.urls import include, path

from . import views

urlpatterns = [
    path("kv/<str:key>", views.kv),
    path("pids", views.pids),
    path("_plugins/", include("connectplugin.contrib.django.urls")),
]
