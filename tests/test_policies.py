"""Policies: every validation error as the exact line an operator sees, selection, resolution.

Error cases are one table: a file's text and the ``file:line: field: message`` line it
must produce, so a changed message or a wrong line number shows up as one failing row.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from virtwarden.policies import (
    BackupSettings,
    DomainFacts,
    Policy,
    check_against_config,
    governing,
    load_dir,
    load_file,
    matching,
    parse_duration,
    parse_metadata,
    resolve_backup,
    selects,
    validate_paths,
)

from virtwarden.config import Config
from virtwarden.errors import NotFound, PolicyError, UnknownStorage

EXAMPLE = Path(__file__).resolve().parent.parent / "policies" / "examples" / "nightly.yaml"
HEADER = "apiVersion: virtwarden/v1\nkind: Policy\nmetadata:\n  name: nightly\nspec:\n"  # spec: is line 5


def spec(text: str) -> str:
    """A policy whose spec is ``text`` (its first line is line 6 of the file)."""
    return HEADER + textwrap.indent(textwrap.dedent(text).strip("\n"), "  ") + "\n"


BACKUP = "backup:\n  target: nfs\n"  # lines 6-7

ERRORS = [
    ("top-level unknown key", HEADER + "  backup: {target: nfs}\nkinds: Policy\n",
     "p.yaml:7: kinds: unknown key (did you mean 'kind'?)"),
    ("spec unknown key", spec(BACKUP + "selectr: {}"),
     "p.yaml:8: spec.selectr: unknown key (did you mean 'selector'?)"),
    ("backup unknown key", spec(BACKUP + "  schedul: '0 2 * * *'"),
     "p.yaml:8: spec.backup.schedul: unknown key (did you mean 'schedule'?)"),
    ("retention unknown key", spec(BACKUP + "  retention:\n    keep_lst: 3"),
     "p.yaml:9: spec.backup.retention.keep_lst: unknown key (did you mean 'keep_last'?)"),
    ("wrong apiVersion", "apiVersion: virtwarden/v2\nkind: Policy\nmetadata: {name: a}\nspec: {bogus: 1}\n",
     "p.yaml:1: apiVersion: unsupported apiVersion 'virtwarden/v2': this virtwarden reads 'virtwarden/v1'"),
    ("wrong kind", "apiVersion: virtwarden/v1\nkind: Polcy\nmetadata: {name: a}\nspec: {}\n",
     "p.yaml:2: kind: unknown kind 'Polcy' (did you mean 'Policy'?): policy files hold kind 'Policy'"),
    ("missing apiVersion", "kind: Policy\nmetadata: {name: a}\nspec: {backup: {target: nfs}}\n",
     "p.yaml:1: apiVersion: Field required"),
    ("missing metadata.name", "apiVersion: virtwarden/v1\nkind: Policy\nmetadata:\n  description: x\n"
     "spec: {backup: {target: nfs}}\n", "p.yaml:3: metadata.name: Field required"),
    ("bad name", HEADER.replace("nightly", "Nightly_DB") + "  " + BACKUP.replace("\n", "\n  "),
     "p.yaml:4: metadata.name: invalid name 'Nightly_DB': use lowercase letters, digits and '-',"
     " starting and ending with a letter or digit, at most 63 characters"),
    ("cron field count", spec(BACKUP + "  schedule: '0 2 * *'"),
     "p.yaml:8: spec.backup.schedule: cron expression '0 2 * *' has 4 fields; expected 5"
     " (minute hour day-of-month month day-of-week)"),
    ("cron six fields", spec(BACKUP + "  schedule: '0 0 2 * * *'"),
     "p.yaml:8: spec.backup.schedule: cron expression '0 0 2 * * *' has 6 fields; expected 5"),
    ("cron bad value", spec(BACKUP + "  schedule: '0 25 * * *'"),
     "p.yaml:8: spec.backup.schedule: invalid cron expression '0 25 * * *': the hour field '25' is not valid"
     " (hour takes 0-23)"),
    ("cron bad weekday", spec(BACKUP + "  schedule: '0 2 * * mon-fry'"),
     "p.yaml:8: spec.backup.schedule: invalid cron expression '0 2 * * mon-fry': the day-of-week field 'mon-fry'"
     " is not valid (day-of-week takes 0-7 or sun-sat)"),
    ("cron never fires", spec(BACKUP + "  schedule: '0 0 31 2 *'"),
     "p.yaml:8: spec.backup.schedule: cron expression '0 0 31 2 *' never fires (no such date)"),
    ("cron bad nickname", spec(BACKUP + "  schedule: '@dayly'"),
     "p.yaml:8: spec.backup.schedule: unknown cron nickname '@dayly' (did you mean '@daily'?)"),
    ("bad timezone", spec(BACKUP + "  schedule: '@daily'\n  timezone: Europe/Pariss"),
     "p.yaml:9: spec.backup.timezone: unknown time zone 'Europe/Pariss' (did you mean 'Europe/Paris'?)"),
    ("timezone case", spec(BACKUP + "  timezone: utc"),
     "p.yaml:8: spec.backup.timezone: unknown time zone 'utc' (did you mean 'UTC'?)"),
    ("bad duration", spec(BACKUP + "  schedule: '@daily'\n  window: 4 hours"),
     "p.yaml:9: spec.backup.window: invalid duration '4 hours': write a number and a unit,"
     " e.g. '90s', '15m', '4h', '2d' or '1h30m' (units s, m, h, d)"),
    ("duration without unit", spec("drill:\n  target: nfs\n  run_for: 90"),
     "p.yaml:8: spec.drill.run_for: the duration 90 needs a unit, e.g. '90s'"),
    ("negative retention", spec(BACKUP + "  retention: {keep_daily: -1}"),
     "p.yaml:8: spec.backup.retention.keep_daily: Input should be greater than or equal to 0"),
    ("empty retention", spec(BACKUP + "  retention: {keep_last: 0}"),
     "p.yaml:8: spec.backup.retention: keeps nothing: set at least one of keep_last, keep_hourly, keep_daily,"
     " keep_weekly, keep_monthly, keep_yearly above 0 (or leave retention out to keep every point)"),
    ("bad strategy", spec(BACKUP + "  strategy: bitmapp"),
     "p.yaml:8: spec.backup.strategy: 'bitmapp' is not one of 'bitmap', 'blockcommit' (did you mean 'bitmap'?)"),
    ("boolean for a choice", spec(BACKUP + "  quiesce: yes"),
     "p.yaml:8: spec.backup.quiesce: must be one of 'auto', 'always', 'never' (YAML read True as a boolean: quote it)"),
    ("full_every not an int", spec(BACKUP + "  full_every: '7'"),
     "p.yaml:8: spec.backup.full_every: Input should be a valid integer"),
    ("bad event", spec(BACKUP + "on:\n  - event: domain.stoped\n    run: backup"),
     "p.yaml:9: spec.on[0].event: 'domain.stoped' is not one of 'domain.defined'"),
    ("bad event hint", spec(BACKUP + "on:\n  - event: domain.stoped\n    run: backup"),
     "(did you mean 'domain.stopped'?)"),
    ("on backup without backup", spec("snapshots: {}\non:\n  - {event: domain.started, run: snapshot}\n"
                                      "  - event: domain.defined\n    run: backup"),
     "p.yaml:10: spec.on[1].run: run: backup needs a spec.backup section (where to store the backup)"),
    ("on snapshot without snapshots", spec(BACKUP + "on: [{event: domain.crashed, run: snapshot}]"),
     "p.yaml:8: spec.on[0].run: run: snapshot needs a spec.snapshots section (type and retention)"),
    ("on drill without source", spec("snapshots: {}\non: [{event: domain.started, run: drill}]"),
     "p.yaml:7: spec.on[0].run: run: drill needs a spec.backup section or spec.drill.target"),
    ("full on a snapshot", spec(BACKUP + "snapshots: {}\non: [{event: domain.crashed, run: snapshot, full: true}]"),
     "p.yaml:9: spec.on[0].full: full applies to run: backup only, not snapshot"),
    ("repeated trigger", spec(BACKUP + "on:\n  - {event: domain.started, run: backup}\n"
                              "  - {event: domain.started, run: backup, full: true}"),
     "p.yaml:10: spec.on[1]: repeats spec.on[0] (domain.started -> backup): one event runs a job once"),
    ("drill without source", spec("drill:\n  run_for: 2m"),
     "p.yaml:6: spec.drill: a drill needs restore points to read: add spec.backup or set spec.drill.target"),
    ("window without schedule", spec(BACKUP + "  window: 4h"),
     "p.yaml:8: spec.backup.window: a window needs a schedule: it counts from each scheduled slot"),
    ("quiesced internal snapshot", spec("snapshots:\n  type: internal\n  quiesce: always"),
     "p.yaml:8: spec.snapshots.quiesce: libvirt quiesces only external (disk-only) snapshots"),
    ("evacuate-by-backup without backup", spec("migration:\n  action: backup"),
     "p.yaml:7: spec.migration.action: action 'backup' needs a spec.backup section"),
    ("a policy asking nothing", spec("selector: {domains: [web-*]}"),
     "p.yaml:5: spec: the policy asks for nothing: add a backup, snapshots, drill, verify or migration section"),
    ("verify sample of nothing", spec(BACKUP + "verify:\n  schedule: '@weekly'\n  sample_percent: 0"),
     "p.yaml:10: spec.verify.sample_percent: Input should be greater than or equal to 1"),
    ("verify sample over everything", spec("verify:\n  sample_percent: 150"),
     "p.yaml:7: spec.verify.sample_percent: Input should be less than or equal to 100"),
    ("verify sample as text", spec("verify:\n  sample_percent: '10%'"),
     "p.yaml:7: spec.verify.sample_percent: Input should be a valid integer"),
    ("verify window without schedule", spec("verify:\n  window: 2h"),
     "p.yaml:7: spec.verify.window: a window needs a schedule: it counts from each scheduled slot"),
    ("verify unknown key", spec("verify:\n  sample: 10"),
     "p.yaml:7: spec.verify.sample: unknown key (did you mean 'sample_percent'?)"),
    ("empty domain list", spec(BACKUP + "selector:\n  domains: []"),
     "p.yaml:9: spec.selector.domains: an empty list selects nothing: leave domains out to select every domain"),
    ("boolean metadata value", spec(BACKUP + "selector:\n  metadata:\n    backup: yes"),
     "p.yaml:10: spec.selector.metadata.backup: must be text; quote it (YAML read it as True)"),
    ("bad metadata key", spec(BACKUP + "selector:\n  metadata:\n    1tier: gold"),
     "p.yaml:9: spec.selector.metadata: invalid metadata key '1tier'"),
    ("migration alert unknown key", spec("migration:\n  on_alerts:\n    - alertnam: HostDown"),
     "p.yaml:8: spec.migration.on_alerts[0].alertnam: unknown key (did you mean 'alertname'?)"),
    ("YAML syntax error", spec(BACKUP + "  schedule: */5 * * * *"),
     "p.yaml:8: YAML syntax: expected alphabetic or numeric character, but found '/' (quote values that start"
     " with '*' or '&', e.g. schedule: \"*/15 * * * *\")"),
    ("YAML syntax error, unclosed", spec(BACKUP + "  retention: {keep_last: 3\n"), "p.yaml:9: YAML syntax:"),
    ("document not a mapping", "- apiVersion: virtwarden/v1\n- kind: Policy\n",
     "p.yaml:1: document: must be a mapping with apiVersion, kind, metadata and spec (found a list)"),
    ("error in a later document", spec(BACKUP) + "---\n# the second one\n"
     + spec(BACKUP + "  strategy: rsync").replace("nightly", "weekly"),
     "p.yaml:17: spec.backup.strategy: 'rsync' is not one of 'bitmap', 'blockcommit'"),
    ("second document not a mapping", spec(BACKUP) + "---\njust text\n",
     "p.yaml:9: document: must be a mapping with apiVersion, kind, metadata and spec (found the str 'just text')"),
]


def _errors(tmp_path: Path, files: dict[str, str], paths: list[str] | None = None) -> list[str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    _, errors = validate_paths([str(tmp_path / p) for p in (paths or list(files))])
    return [e.replace(f"{tmp_path}/", "") for e in errors]


@pytest.mark.parametrize("text,expected", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_each_error_names_file_line_field_and_fix(tmp_path: Path, text: str, expected: str) -> None:
    errors = _errors(tmp_path, {"p.yaml": text})
    assert any(expected in e for e in errors), "\n".join(errors)


def test_duplicate_names_across_files_point_at_the_first(tmp_path: Path) -> None:
    (tmp_path / "pol").mkdir()
    errors = _errors(tmp_path, {"pol/a.yaml": spec(BACKUP), "pol/b.yml": "# b\n" + spec(BACKUP)}, ["pol"])
    assert errors == ["pol/b.yml:5: metadata.name: duplicate policy name 'nightly' (first defined at pol/a.yaml:4)"]


def test_missing_path_is_an_error_line(tmp_path: Path) -> None:
    assert _errors(tmp_path, {}, ["nowhere.yaml"]) == ["nowhere.yaml: no such file or directory"]


def test_errors_of_every_document_are_raised_together(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(spec(BACKUP + "  strategy: x") + "---\n" + spec(BACKUP + "  quiesce: x").replace("nightly", "b"))
    with pytest.raises(PolicyError) as caught:
        load_file(path)
    assert [line.split(": ")[1] for line in str(caught.value).splitlines()] == ["spec.backup.strategy",
                                                                                "spec.backup.quiesce"]


def test_example_policy_file_is_valid() -> None:
    found = load_file(EXAMPLE)
    assert [p.name for p in found] == ["nightly", "databases"]
    db = found[1]
    assert db.spec.on[0].event == "domain.crashed"  # the YAML key 'on' is not read as True
    assert db.spec.backup is not None and db.spec.backup.window == 1800
    assert db.spec.migration is not None and db.spec.migration.timeout == 600
    assert db.source_text == f"{EXAMPLE}:63"


def test_load_dir_reads_yaml_files_in_name_order_and_skips_others(tmp_path: Path) -> None:
    for name, policy in [("b.yaml", "zeta"), ("a.yml", "alpha"), (".c.yaml", "hidden"), ("d.txt", "text")]:
        (tmp_path / name).write_text(spec(BACKUP).replace("nightly", policy))
    assert [p.name for p in load_dir(tmp_path)] == ["alpha", "zeta"]


def test_a_held_reading_sees_the_policies_of_its_first_look_and_stats_no_file_after_it(
        tmp_path: Path, monkeypatch) -> None:
    """What a scheduler tick does: within ``held()`` the directory is looked at once, so
    an edit in the middle of the tick changes nothing in it (and costs no stat per
    slot); the next reading sees it. A nested hold is the same hold."""
    from virtwarden.policies import loader

    (tmp_path / "a.yaml").write_text(spec(BACKUP).replace("nightly", "alpha"))
    looks: list[Path] = []
    signature = loader._signature
    monkeypatch.setattr(loader, "_signature", lambda d: (looks.append(d), signature(d))[1])
    with loader.held():
        assert [p.name for p in load_dir(tmp_path)] == ["alpha"]
        (tmp_path / "a.yaml").write_text(spec(BACKUP).replace("nightly", "bravo"))
        with loader.held():
            assert [p.name for p in load_dir(tmp_path)] == ["alpha"]
        assert [p.name for p in load_dir(tmp_path)] == ["alpha"]
        assert looks == [tmp_path]
    assert [p.name for p in load_dir(tmp_path)] == ["bravo"]
    assert len(looks) == 2


def test_a_missing_policy_directory_holds_no_policies_only_when_allowed_and_is_looked_at_once_held(
        tmp_path: Path, monkeypatch) -> None:
    """The configured directory may not exist (no policies yet); a path given to
    ``policy validate`` must. Within ``held()`` a missing directory, too, is looked at
    once, not once per slot of a tick."""
    from virtwarden.policies import loader

    missing = tmp_path / "nowhere"
    with pytest.raises(PolicyError, match="nowhere"):
        load_dir(missing)
    looks: list[Path] = []
    is_dir = Path.is_dir
    monkeypatch.setattr(Path, "is_dir", lambda self: (looks.append(self), is_dir(self))[1])
    with loader.held():
        for _ in range(3):
            assert load_dir(missing, missing_ok=True) == []
    assert looks == [missing]


def test_load_dir_reads_the_files_again_only_when_they_change(tmp_path: Path, monkeypatch) -> None:
    """Every process asks for the policies often (a scheduler tick, each listener event):
    an unchanged directory is not read again; any change is seen on the next call; a
    file changed within the last clock ticks is read every time."""
    import os

    from virtwarden.policies import loader

    reads: list[str] = []
    read = loader._Reader.file
    monkeypatch.setattr(loader._Reader, "file", lambda self, path: (reads.append(path.name), read(self, path)))
    (tmp_path / "a.yaml").write_text(spec(BACKUP).replace("nightly", "alpha"))
    assert [p.name for p in load_dir(tmp_path)] == [p.name for p in load_dir(tmp_path)] == ["alpha"]
    assert reads == ["a.yaml", "a.yaml"]  # just written: it may change again within the same tick

    monkeypatch.setattr(loader, "SETTLE_SECONDS", 0.0)  # from here on, files count as settled at once
    reads.clear()
    first = load_dir(tmp_path)
    assert load_dir(tmp_path) == first and reads == ["a.yaml"]  # read once

    def later(name: str) -> None:  # as a save one clock tick after the last would be
        st = (tmp_path / name).stat()
        os.utime(tmp_path / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))

    (tmp_path / "a.yaml").write_text(spec(BACKUP).replace("nightly", "bravo"))  # same size, rewritten in place
    later("a.yaml")
    assert [p.name for p in load_dir(tmp_path)] == ["bravo"]
    (tmp_path / "b.yaml").write_text(spec(BACKUP).replace("nightly", "charlie"))  # a file added
    assert [p.name for p in load_dir(tmp_path)] == ["bravo", "charlie"]
    (tmp_path / ".b.yaml.new").write_text(spec(BACKUP).replace("nightly", "delta"))  # replaced by a rename
    os.replace(tmp_path / ".b.yaml.new", tmp_path / "b.yaml")
    assert [p.name for p in load_dir(tmp_path)] == ["bravo", "delta"]
    (tmp_path / "a.yaml").unlink()  # a file removed
    assert [p.name for p in load_dir(tmp_path)] == ["delta"]
    reads.clear()
    assert [p.name for p in load_dir(tmp_path)] == ["delta"] and reads == []

    (tmp_path / "b.yaml").write_text("apiVersion: virtwarden/v1\nkind: Policy\n")  # broken: an error every time
    for _ in range(2):
        with pytest.raises(PolicyError):
            load_dir(tmp_path)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("4h", 14400), ("2d", 172800),
                                          ("1h30m", 5400), ("1d2h3m4s", 93784)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "0s", "1h30", "30m1h", "4 hours", "-5m", True, 3.5])
def test_bad_durations_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


# --- selection ----------------------------------------------------------------------------
def make(name: str, *, priority: int = 0, target: str = "nfs", **selector: object) -> Policy:
    return Policy.model_validate({"apiVersion": "virtwarden/v1", "kind": "Policy", "metadata": {"name": name},
                                  "spec": {"selector": selector, "backup": {"target": target, "priority": priority}}})


@pytest.mark.parametrize("selector,facts,expected", [
    ({}, DomainFacts("anything"), True),
    ({"domains": ["web-*", "db-?"]}, DomainFacts("db-1"), True),
    ({"domains": ["web-*"]}, DomainFacts("Web-1"), False),  # case-sensitive, as libvirt names are
    ({"domains": ["web-*"], "exclude": ["*-tmp"]}, DomainFacts("web-tmp"), False),
    ({"hosts": ["kvm-*"]}, DomainFacts("vm", "kvm-2"), True),
    ({"hosts": ["kvm-*"]}, DomainFacts("vm", "edge-1"), False),
    ({"hosts": ["kvm-*"]}, DomainFacts("vm", None), True),  # host not known yet: not checked
    ({"metadata": {"tier": "gold", "zone": 1}}, DomainFacts("vm", metadata={"tier": "gold", "zone": "1"}), True),
    ({"metadata": {"tier": "gold"}}, DomainFacts("vm", metadata={"tier": "silver"}), False),
    ({"metadata": {"tier": "gold"}}, DomainFacts("vm"), False),
])
def test_selects(selector: dict, facts: DomainFacts, expected: bool) -> None:
    assert selects(make("p", **selector), facts) is expected


def test_matching_keeps_only_policies_with_the_job_highest_priority_first() -> None:
    snap_only = Policy.model_validate({"apiVersion": "virtwarden/v1", "kind": "Policy",
                                       "metadata": {"name": "snaps"}, "spec": {"snapshots": {}}})
    found = matching([make("low"), make("high", priority=5), snap_only], DomainFacts("vm"))
    assert [p.name for p in found] == ["high", "low"]
    assert [p.name for p in matching([snap_only, make("low")], DomainFacts("vm"), "snapshot")] == ["snaps"]
    assert [p.name for p in matching([make("low")], DomainFacts("vm"), "drill")] == ["low"]  # backups can be drilled


def test_highest_priority_governs_and_a_tie_is_an_error() -> None:
    winner = governing([make("all"), make("db", priority=10, domains=["db-*"])], DomainFacts("db-1"))
    assert winner is not None and winner.name == "db"
    assert governing([make("db", domains=["db-*"])], DomainFacts("web")) is None
    with pytest.raises(PolicyError, match=r"policies 'a' \(<memory>:1\) and 'b' \(<memory>:1\) both select"
                                          r" domain 'vm' for backup with priority 0"):
        governing([make("a"), make("b"), make("c", priority=-1)], DomainFacts("vm"))


def test_parse_metadata_reads_the_virtwarden_element() -> None:
    xml = ("<domain><name>vm</name><metadata><other xmlns='urn:x'><tier>no</tier></other>"
           "<vw:virtwarden xmlns:vw='https://virtwarden.dev/xmlns/1'><vw:tier>gold</vw:tier></vw:virtwarden>"
           "</metadata></domain>")
    assert parse_metadata(xml) == {"tier": "gold"}
    assert parse_metadata("<domain><name>vm</name></domain>") == {}


# --- resolve_backup -----------------------------------------------------------------------
@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(
        spec("selector: {domains: [db-*]}\nbackup:\n  target: s3\n  strategy: blockcommit\n  full_every: 3")
        + "---\n" + spec("snapshots: {}").replace("nightly", "snaps-only"))
    return tmp_path / "policies"


def config(tmp_path: Path, *storage: str, policy_dir: Path | None = None) -> Config:
    return Config.model_validate({"data_dir": str(tmp_path), "policy_dir": str(policy_dir or tmp_path / "none"),
                                  "storage": {n: {"type": "nfs", "path": f"/srv/{n}"} for n in storage}})


def test_a_selecting_policy_gives_its_settings(tmp_path: Path, policy_dir: Path) -> None:
    cfg = config(tmp_path, "nfs", "s3", policy_dir=policy_dir)
    assert resolve_backup(cfg, "db-1") == BackupSettings("nightly", "s3", "blockcommit", 3, "auto")
    assert resolve_backup(cfg, "db-1", target="nfs").target == "nfs"  # an explicit target wins


def test_a_named_policy_is_used_even_if_it_does_not_select(tmp_path: Path, policy_dir: Path) -> None:
    cfg = config(tmp_path, "nfs", "s3", policy_dir=policy_dir)
    assert resolve_backup(cfg, "web-1", policy="nightly").policy == "nightly"
    with pytest.raises(NotFound, match=r"no policy named 'nigthly' \(did you mean 'nightly'\?\)"
                                       r" \(known: nightly, snaps-only\)"):
        resolve_backup(cfg, "web-1", policy="nigthly")
    with pytest.raises(PolicyError, match="policy 'snaps-only' has no spec.backup section"):
        resolve_backup(cfg, "web-1", policy="snaps-only")


def test_no_policy_and_one_storage_gives_defaults(tmp_path: Path) -> None:
    assert resolve_backup(config(tmp_path, "local"), "vm") == BackupSettings(None, "local", "bitmap", 7, "auto")


def test_no_policy_and_two_storages_asks_for_a_target(tmp_path: Path) -> None:
    cfg = config(tmp_path, "nfs", "s3")
    with pytest.raises(PolicyError, match=r"no policy selects domain 'vm' and 2 storage targets are configured"
                                          r" \(nfs, s3\): name one with --target or write a policy"):
        resolve_backup(cfg, "vm")
    assert resolve_backup(cfg, "vm", target="s3").target == "s3"


def test_an_unknown_target_is_refused_with_the_configured_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownStorage, match=r"storage 'nsf' is not configured \(did you mean 'nfs'\?\)"
                                             r" \(configured: nfs, s3\)"):
        resolve_backup(config(tmp_path, "nfs", "s3"), "vm", target="nsf")


def test_check_against_config_names_unconfigured_targets(tmp_path: Path, policy_dir: Path) -> None:
    errors = check_against_config(load_dir(policy_dir), config(tmp_path, "nfs", "s3x"))
    assert [e.replace(f"{policy_dir}/", "") for e in errors] == [
        "p.yaml:8: spec.backup.target: storage 's3' is not configured (did you mean 's3x'?) (configured: nfs, s3x)"]
