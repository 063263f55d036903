from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.webapps.djangoproject.settings")
application = get_wsgi_application()
if os.environ.get("WEBAPP_MOUNT") == "wsgi":
    from connectplugin.contrib.django import wrap

    application = wrap(application)
