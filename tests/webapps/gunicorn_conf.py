"""gunicorn settings for the tests: each worker says when it handles signals itself.

Until a worker has set its own signal handlers it still has its master's, and a SIGTERM
then only queues in its copy of the master's signal queue: that worker lives on until the
graceful timeout. A test that stops a server waits for this line from every worker first.
"""

WORKER_READY = "worker ready for signals"


def post_worker_init(worker):  # gunicorn calls it after the worker set its signal handlers
    worker.log.info("%s: %s", WORKER_READY, worker.pid)
