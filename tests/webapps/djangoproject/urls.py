from __future__ import annotations

import os

from django.urls import include, path

from . import views

urlpatterns = [path("kv/<str:key>", views.kv), path("pids", views.pids)]
if os.environ.get("WEBAPP_MOUNT") == "urls":
    urlpatterns.append(path("_plugins/", include("connectplugin.contrib.django.urls")))
