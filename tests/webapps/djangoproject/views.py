from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from connectplugin.contrib import django as connectplugin
from samples.kv.gen.kv.v1 import kv_pb2


@csrf_exempt
def kv(request: HttpRequest, key: str) -> HttpResponse:
    store = connectplugin.dispense("kv")
    if request.method == "POST":
        store.put(kv_pb2.PutRequest(key=key, value=request.body))
        return HttpResponse(b"")
    return HttpResponse(store.get(kv_pb2.GetRequest(key=key)).value)


def pids(request: HttpRequest) -> JsonResponse:
    launched = connectplugin.plugins().launched()
    host = connectplugin.host() if launched else None
    reported = [host.reported_health(host.runtime_id(c)) for c in launched.values()] if host else []
    return JsonResponse(
        {
            "pid": os.getpid(),
            "plugins": [c.running.pid for c in launched.values() if c.running],
            "host_url": host.url if host else "",
            "reported": [r.state.name if r else None for r in reported],
        }
    )
