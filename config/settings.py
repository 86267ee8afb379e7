"""Rankwise settings. Everything that differs between machines comes from the environment."""

import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(env.str("RANKWISE_ENV_FILE", default=str(BASE_DIR / ".env")))

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY is not set: put it in the environment or in .env (`make run` writes one).")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])

DATA_DIR = Path(env.str("RANKWISE_DATA_DIR", default=str(BASE_DIR / "var"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)
DEFAULT_MODEL_DIR = DATA_DIR / "models" / "SmolLM2-135M-Instruct"
BASE_MODEL = env.str("RANKWISE_BASE_MODEL", default=str(DEFAULT_MODEL_DIR))
MODEL_VERSIONS_DIR = DATA_DIR / "versions"
EXPORTS_DIR = DATA_DIR / "exports"
# Processes that share a large JSONL export (feedback.services.exports.export_jsonl): one per core, at most four.
_export_workers = env.str("RANKWISE_EXPORT_WORKERS", default=str(min(4, len(os.sched_getaffinity(0)))))
if not (_export_workers.isascii() and _export_workers.isdigit()) or int(_export_workers) < 1:
    raise ImproperlyConfigured(f"RANKWISE_EXPORT_WORKERS must be a whole number of at least 1, not {_export_workers!r}")
EXPORT_WORKERS = int(_export_workers)
REFERENCE_CACHE_DIR = DATA_DIR / "reference-cache"


def _limit(name: str, default: int) -> int:
    """A RANKWISE_MAX_* (or other count) setting: a whole number of at least 1, or start-up stops naming it."""
    value = env.str(name, default=str(default))
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ImproperlyConfigured(f"{name} must be a whole number of at least 1, not {value!r}")
    return int(value)


# Limits on imported prompts (feedback.services.prompts), high enough that a team rarely raises them.
# The model name is stored in Completion.source_model; feedback.apps refuses a limit above that column's length.
RANKWISE_MAX_PROMPT_CHARS = _limit("RANKWISE_MAX_PROMPT_CHARS", 100_000)  # all of a prompt's messages together
RANKWISE_MAX_COMPLETION_CHARS = _limit("RANKWISE_MAX_COMPLETION_CHARS", 100_000)
RANKWISE_MAX_COMPLETIONS = _limit("RANKWISE_MAX_COMPLETIONS", 64)  # on one imported record
RANKWISE_MAX_MODEL_NAME_CHARS = _limit("RANKWISE_MAX_MODEL_NAME_CHARS", 300)
RANKWISE_MAX_UPLOAD_BYTES = _limit("RANKWISE_MAX_UPLOAD_BYTES", 50 * 1024 * 1024)  # a prompt import's body

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "django_htmx",
    "template_partials",
    "huey.contrib.djhuey",
    "feedback",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "feedback.middleware.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# SQLite by default: WAL so readers never wait for the writer, IMMEDIATE so a write
# transaction takes the lock up front instead of failing on upgrade, and a busy timeout
# so concurrent annotators queue for the lock rather than erroring.
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'rankwise.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    # A file, not memory, so live-server threads and worker processes in tests share it; one per test process.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / f"test-rankwise-{os.getpid()}.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="")
# Failed-login and failed-token counts (feedback.services.throttling) and the API's rate limits live in the
# cache, so every process must see the same one: Redis when there is one (several machines), else files in
# the data dir (every gunicorn worker and the huey consumer on this machine). Memory would be per process.
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": DATA_DIR / "cache"}
    }
HUEY = {
    "name": "rankwise",
    "immediate": env.bool("HUEY_IMMEDIATE", default=False),
    "utc": True,
    "consumer": {"workers": 1, "worker_type": "thread", "periodic": True},
}
if REDIS_URL:
    HUEY |= {"huey_class": "huey.RedisHuey", "url": REDIS_URL}
else:
    HUEY |= {"huey_class": "huey.SqliteHuey", "filename": str(DATA_DIR / "huey.sqlite3")}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = True

REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header makes an anonymous caller's answer a 401, not a 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "feedback.api.authentication.ThrottledTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["feedback.api.parsers.BoundedJSONParser"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_RATES": {"submit": "120/min"},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Rankwise API",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "feedback.api.schema.token_throttling_documented",
    ],
    # Project modes appear as `mode` and as a task's `kind`: one name for the one choice set.
    "ENUM_NAME_OVERRIDES": {
        "ProjectModeEnum": "feedback.models.Project.Mode",
        # A job's `file_type` and the `file` asked for are the same choice set.
        "FileTypeEnum": "feedback.services.exports.FILE_TYPES",
        # `kind` is a round's (training, battle) and an item's (pairwise, ranking).
        "RoundKindEnum": "feedback.models.Round.Kind",
        "ItemKindEnum": [("pairwise", "pairwise"), ("ranking", "ranking")],
    },
}

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
# Behind a reverse proxy that sets X-Forwarded-Proto and appends the client to X-Forwarded-For: trust both
# headers. Off, a client could claim HTTPS or any address, so both are ignored.
BEHIND_PROXY = env.bool("RANKWISE_BEHIND_PROXY", default=False)
if BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Load balancers and supervisors probe GET /healthz over plain HTTP on the app's own port.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
if not DEBUG:
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    # A year of HSTS for this host only; subdomains and the browsers' preload list are the operator's choice,
    # since both outlive the setting (a preloaded domain stays HTTPS-only for months after it is removed).
    SECURE_HSTS_SECONDS = env.int("RANKWISE_HSTS_SECONDS", default=60 * 60 * 24 * 365)
    SECURE_HSTS_PRELOAD = env.bool("RANKWISE_HSTS_PRELOAD", default=False)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_PRELOAD  # the preload list requires includeSubDomains
    if not SECURE_HSTS_PRELOAD:
        # check --deploy asks for both; leaving them off is the documented default, not an oversight.
        SILENCED_SYSTEM_CHECKS = ["security.W005", "security.W021"]
    SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=True)
    CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=True)
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# How often the scheduler looks for projects due for training, in minutes.
TRAINING_SCHEDULE_MINUTES = env.int("RANKWISE_TRAINING_SCHEDULE_MINUTES", default=5)


# Upper limits of a training config (feedback.services.training_runs), high enough that a team rarely raises them:
# the epochs of a run, and its batch sizes (examples per training and per evaluation forward pass).
RANKWISE_MAX_TRAINING_EPOCHS = _limit("RANKWISE_MAX_TRAINING_EPOCHS", 100)
RANKWISE_MAX_TRAINING_BATCH_SIZE = _limit("RANKWISE_MAX_TRAINING_BATCH_SIZE", 512)
# Processes a DPO or GRPO run trains in (data-parallel, one per GPU): above 1 the worker starts the run
# under torchrun (feedback.services.training_runs); 1 trains inside the worker itself.
TRAIN_PROCESSES = _limit("RANKWISE_TRAIN_PROCESSES", 1)
# What writes completions (feedback.services.generation): our own decoding loop (torch), or vLLM on a GPU
# (the `vllm` extra); a worker without vLLM or a GPU refuses to write with it at the first generation.
GENERATION_BACKENDS = ("torch", "vllm")
GENERATION_BACKEND = env.str("RANKWISE_GENERATION_BACKEND", default="torch")
if GENERATION_BACKEND not in GENERATION_BACKENDS:
    raise ImproperlyConfigured(
        f"RANKWISE_GENERATION_BACKEND must be one of {', '.join(GENERATION_BACKENDS)}, not {GENERATION_BACKEND!r}"
    )
# When a project's queue wants fewer judgements than this, the worker writes the next round of
# completions for this many prompts that lack them.
GENERATION_LOW_WATER = env.int("RANKWISE_GENERATION_LOW_WATER", default=20)
GENERATION_ROUND_PROMPTS = env.int("RANKWISE_GENERATION_ROUND_PROMPTS", default=25)
# A running training run whose heartbeat is older than this is taken for dead and failed.
TRAINING_RUN_STALE_SECONDS = env.int("RANKWISE_TRAINING_RUN_STALE_SECONDS", default=180)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"huey": {"handlers": [], "propagate": False}},  # the consumer logs huey's lines itself
}
