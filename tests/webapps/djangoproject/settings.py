"""Settings of the test project: the connectplugin app, CSRF on, one sqlite database."""

from __future__ import annotations

import os

from connectplugin import ProcessStrategy
from tests.webapps import KV_COMMAND, KV_ENV

SECRET_KEY = "test-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["django.contrib.contenttypes", "connectplugin.contrib.django"]
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "tests.webapps.djangoproject.urls"
WSGI_APPLICATION = "tests.webapps.djangoproject.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("WEBAPP_DB", ":memory:"),
    }
}
USE_TZ = True

CONNECTPLUGIN = {
    "HANDSHAKE": "samples.kv.plugin:HANDSHAKE",
    "PLUGINS": "samples.kv.plugin:PLUGINS",
    "LAUNCH": {"kv": ProcessStrategy(KV_COMMAND, env=KV_ENV)},
    "URL": os.environ.get("WEBAPP_HOST_URL", ""),
}
