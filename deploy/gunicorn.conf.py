"""gunicorn settings for Rankwise: `gunicorn --config deploy/gunicorn.conf.py config.wsgi`.

Every value can be changed from the environment, so the same file serves every machine.
"""

import os

bind = os.environ.get("RANKWISE_BIND", "127.0.0.1:8000")
# Requests are short and mostly wait on the database; two processes per core keeps both cores busy.
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * len(os.sched_getaffinity(0))))
# Long work (training, generation, large exports) runs in the huey worker, never in a request, so a request
# that takes longer than this is stuck and its process is replaced.
timeout = int(os.environ.get("RANKWISE_WEB_TIMEOUT", 60))
graceful_timeout = 30
# Replacing a process now and then bounds what a slow leak can grow to; the jitter keeps them from restarting together.
max_requests = 2000
max_requests_jitter = 200
accesslog = "-"
errorlog = "-"
# Only the proxy on this machine may say a request came over HTTPS (Django's RANKWISE_BEHIND_PROXY trusts it).
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
