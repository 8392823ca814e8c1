from __future__ import annotations

import base64
import shutil

import pytest

from enclavify.errors import PolicyError
from enclavify.policy import (
    default_template,
    fill_template,
    parse_session,
    render_configuration,
    session_image_name,
)
from enclavify.secrets import SecretValue, generate_secrets
from tests.sconify_support import example_hooks

from .conftest import FSPF_KEY, FSPF_TAG, MRENCLAVE


@pytest.fixture(scope="module")
def shell_hooks() -> tuple[str, str]:
    """The example's SECRETS and INJECTED_FILES as the shell expands them (`\\$\\$` to `$$`)."""
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to expand the hooks as a shell does")
    hooks = example_hooks()
    assert "$$SCONE::flask.crt$$" in hooks["INJECTED_FILES"]
    return hooks["SECRETS"], hooks["INJECTED_FILES"]


def _fill(**changes: object) -> str:
    arguments: dict[str, object] = {
        "name": "flask",
        "namespace": "my_namespace-4711",
        "image_name": "localhost:5055/flask_restapi_image:latest",
        "measurement": MRENCLAVE,
        "command": ["python3", "-B", "/app/rest_api.py"],
        "environment": {"LANG": "C.UTF-8", "GREETING": 'say "hi"\n$HOME'},
        "pwd": "/app",
        "fspf_path": "/.enclavify/fspf",
        "fspf_key": FSPF_KEY,
        "fspf_tag": FSPF_TAG,
    }
    arguments.update(changes)
    return fill_template(default_template(), **arguments)  # type: ignore[arg-type]


def _fill_bare(template: str, **changes: object) -> str:
    """Fill ``template`` with the fewest values fill_template needs, plus ``changes``."""
    arguments: dict[str, object] = {
        "name": "x",
        "image_name": "img",
        "measurement": MRENCLAVE,
        "command": ["a"],
        "environment": {},
        "fspf_path": "/f",
        "fspf_key": FSPF_KEY,
        "fspf_tag": FSPF_TAG,
    }
    arguments.update(changes)
    return fill_template(template, **arguments)  # type: ignore[arg-type]


def test_default_template_without_hooks() -> None:
    session = parse_session(_fill())
    assert session.name == "my_namespace-4711/flask"
    service = session.services[0]
    assert service.name == "service"
    assert service.image_name == "localhost_5055_flask_restapi_image_latest"
    assert session.images[0].name == service.image_name
    assert service.command == ("python3", "-B", "/app/rest_api.py")
    assert dict(service.environment) == {"LANG": "C.UTF-8", "GREETING": 'say "hi"\n$HOME'}
    assert service.attestation.mrenclave == (MRENCLAVE,)
    assert (service.fspf_path, service.fspf_key, service.fspf_tag) == (
        "/.enclavify/fspf",
        FSPF_KEY,
        FSPF_TAG,
    )
    assert session.attestation.mode == "hardware"
    assert session.predecessor is None
    assert session.secrets == ()


def test_seed_hooks_fill_default_template(shell_hooks: tuple[str, str]) -> None:
    secrets_hook, injected_hook = shell_hooks
    text = _fill(secrets_hook=secrets_hook, injected_files_hook=injected_hook)
    session = parse_session(text)
    assert [s.name for s in session.secrets] == ["api_ca_key", "api_ca_cert", "flask_key", "flask"]
    files = session.images[0].injection_files
    assert [(f.path, f.content) for f in files] == [
        ("/tls/flask.crt", "$$SCONE::flask.crt$$"),
        ("/tls/flask.key", "$$SCONE::flask.key$$"),
    ]
    # The filled session renders: the injected files carry the certificate and its key.
    values = generate_secrets(session, {}, _no_import)
    configuration = render_configuration(session, "service", values)
    contents = {
        f["path"]: base64.b64decode(f["content"]).decode() for f in configuration["injection_files"]
    }
    assert contents["/tls/flask.crt"] == values["flask"].render("crt")
    assert contents["/tls/flask.key"] == values["flask_key"].render(None)


def _no_import(session: str, secret: str) -> SecretValue:
    raise AssertionError("no imports expected")


def test_hooks_work_at_any_indentation() -> None:
    template = "name: $SESSION\nimages:\n  - name: $IMAGE_NAME\n    ${INJECTED_FILES}\n$SECRETS\n"
    text = _fill_bare(
        template,
        secrets_hook="        secrets:\n          - {name: s, kind: ascii}\n",
        injected_files_hook="injection_files:\n- path: /etc/s\n  content: $$SCONE::s$$\n",
    )
    session = parse_session(text)
    assert session.images[0].injection_files[0].content == "$$SCONE::s$$"
    assert session.secrets[0].name == "s"


def test_simulation_mode_and_tolerations() -> None:
    session = parse_session(
        _fill(attestation_mode="simulation", tolerate=["debug-mode"], ignore_advisories="*")
    )
    assert session.attestation.accepts_simulation
    assert session.attestation.tolerate == ("debug-mode",)
    assert session.attestation.ignore_all_advisories


def test_predecessor_is_filled() -> None:
    session = parse_session(_fill(predecessor="ab" * 32))
    assert session.predecessor == "ab" * 32
    # A template without $PREDECESSOR gets the line appended.
    template = default_template().replace("predecessor: $PREDECESSOR\n", "")
    text = _fill_bare(template, predecessor="cd" * 32)
    assert parse_session(text).predecessor == "cd" * 32


def test_values_cannot_inject_yaml() -> None:
    hostile = {"X": "a\naccess_policy: {read: [ANY]}", "Y": '"}, evil: {'}
    session = parse_session(_fill(environment=hostile, pwd="/odd dir: #x"))
    assert dict(session.services[0].environment) == hostile
    assert session.services[0].pwd == "/odd dir: #x"
    assert session.access_policy.read == ("CREATOR",)


@pytest.mark.parametrize(
    ("hook", "words"),
    [
        ("injection_files: []", "single key 'secrets'"),
        ("secrets: {a: 1}", "must be a list"),
        ("secrets: [\n", "SECRETS hook"),
    ],
)
def test_wrong_secrets_hook_is_rejected(hook: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        _fill(secrets_hook=hook)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("hook", "path", "words"),
    [
        (
            "injection_files:\n  - path: relative/file\n    content: x\n",
            "images[0].injection_files[0].path",
            "absolute",
        ),
        (
            "injection_files:\n  - path: /x\n    content: $$SCONE::nothing$$\n",
            "images[0].injection_files[0].content",
            "'nothing' is not defined",
        ),
    ],
)
def test_hook_errors_name_the_filled_path(hook: str, path: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        _fill(injected_files_hook=hook)
    assert info.value.path == path
    assert words in str(info.value)


def test_unknown_variable_is_rejected() -> None:
    with pytest.raises(PolicyError) as info:
        _fill_bare(default_template() + "# $COMMENTS_ARE_IGNORED\nextra: $TYPO\n")
    assert "$TYPO" in str(info.value)


def test_missing_hook_placeholder_is_rejected() -> None:
    template = default_template().replace("$SECRETS\n", "")
    with pytest.raises(PolicyError) as info:
        _fill_bare(template, secrets_hook="secrets: []")
    assert "$SECRETS" in str(info.value)


def test_invalid_filled_values_name_the_path() -> None:
    with pytest.raises(PolicyError) as info:
        _fill(fspf_key="short")
    assert info.value.path == "services[0].fspf_key"
    assert "filled template" in str(info.value)
    with pytest.raises(PolicyError) as info:
        _fill(namespace="bad namespace")
    assert info.value.path == "name"


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("flask_restapi_image", "flask_restapi_image"),
        ("localhost:5055/team/app:1.2", "localhost_5055_team_app_1.2"),
        ("app@sha256:" + "a" * 64, "app_sha256_" + "a" * 64),
        (":::", "image"),
    ],
)
def test_session_image_name(reference: str, expected: str) -> None:
    assert session_image_name(reference) == expected


def test_empty_working_directory_is_root() -> None:
    assert parse_session(_fill(pwd="")).services[0].pwd == "/"
