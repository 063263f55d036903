"""The host's endpoints for ``path("_plugins/", include("connectplugin.contrib.django.urls"))``.

The include's prefix must be the path of ``CONNECTPLUGIN["URL"]``: that is where plugins call.
"""

from __future__ import annotations

from django.urls import re_path

from .views import host_endpoint

app_name = "connectplugin"
urlpatterns = [re_path(r"^(?P<path>.*)$", host_endpoint, name="host")]
