"""Slurm host lists: the pure parser, the scontrol/DNS edges with fakes, and Slurm itself when present."""

import shutil
import socket
import subprocess

import pytest

from hpcinfer.launch.slurm.nodelist import expand_nodelist, hostnames, resolve_address

EXPANSIONS = {
    "n1": ["n1"],
    "n01": ["n01"],
    "gpu[001-003]": ["gpu001", "gpu002", "gpu003"],
    "node[8-11]": ["node8", "node9", "node10", "node11"],
    "n[01-100]": [f"n{i:02d}" for i in range(1, 101)],
    "n[1-003]": ["n1", "n2", "n3"],  # the width is the lower bound's
    "n[7]": ["n7"],
    "gpu[001-003,7]": ["gpu001", "gpu002", "gpu003", "gpu7"],
    "gpu[7,001-002]": ["gpu7", "gpu001", "gpu002"],  # order as given, not sorted
    "x1,y[2-3],z": ["x1", "y2", "y3", "z"],
    "a[1-2],b[08-10,3],c": ["a1", "a2", "b08", "b09", "b10", "b3", "c"],
    "r[1-2]n[01-02]": ["r1n01", "r1n02", "r2n01", "r2n02"],  # first bracket varies slowest
    # Slurm's order with three brackets: the last fastest, then the first, the second slowest
    "a[1-2]b[1-2]c[5-6]": ["a1b1c5", "a1b1c6", "a2b1c5", "a2b1c6", "a1b2c5", "a1b2c6", "a2b2c5", "a2b2c6"],
    "a[1-2]b[3-4]c[5-6]d[7-8]": [f"a{a}b{b}c{c}d{d}" for c in "56" for b in "34" for a in "12" for d in "78"],
    "gpu-a[1-2].cluster": ["gpu-a1.cluster", "gpu-a2.cluster"],
    "rack[1-2]-n[3-4]": ["rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"],
    "n1,n1,n[1-2]": ["n1", "n1", "n1", "n2"],  # duplicates kept
    "n[1-3,2]": ["n1", "n2", "n3", "n2"],
    "[1-2]": ["1", "2"],
}


@pytest.mark.parametrize("expr", list(EXPANSIONS))
def test_expand_nodelist(expr):
    assert expand_nodelist(expr) == EXPANSIONS[expr]


BAD = {
    "": "empty",
    "n[1-2": "never closed",
    "n1-2]": "without '['",
    "n[1[2]]": "nested",
    "n[]": "empty brackets",
    "n[5-3]": "reversed",
    "n[a-c]": "'a-c'",
    "n[1-c]": "'1-c'",
    "n[3-]": "'3-'",
    "n[-3]": "'-3'",
    "n[1,,2]": "''",
    "n[1-2-3]": "'1-2-3'",
    "n1, n2": "whitespace",
    "n1\tn2": "whitespace",
    "n1,,n2": "empty item",
    ",n1": "empty item",
    "n1,": "empty item",
    "n[0-70000]": "more than",
}


@pytest.mark.parametrize("expr", list(BAD))
def test_expand_nodelist_rejects(expr):
    with pytest.raises(ValueError) as e:
        expand_nodelist(expr)
    assert repr(expr) in str(e.value)  # the message quotes the input...
    assert BAD[expr] in str(e.value)  # ...and says what is wrong with it


def test_hostnames_falls_back_to_the_parser_without_scontrol(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not run anything"))
    assert hostnames("gpu[01-02],login") == ["gpu01", "gpu02", "login"]
    with pytest.raises(ValueError, match="reversed"):
        hostnames("n[2-1]")


def fake_scontrol(monkeypatch, returncode=0, stdout="", raises=None):
    """scontrol on PATH; its runs are recorded and answer `stdout` with `returncode`."""
    calls = []

    def run(args, **kw):
        calls.append(args)
        if raises:
            raise raises
        return subprocess.CompletedProcess(args, returncode, stdout=stdout, stderr="")

    monkeypatch.setattr(shutil, "which", lambda name: "/opt/slurm/bin/" + name)
    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_hostnames_prefers_scontrol(monkeypatch):
    calls = fake_scontrol(monkeypatch, stdout="alpha\nbeta\n")
    assert hostnames("whatever[1-2]") == ["alpha", "beta"]
    assert calls == [["/opt/slurm/bin/scontrol", "show", "hostnames", "whatever[1-2]"]]


@pytest.mark.parametrize(
    "kw",
    [
        {"returncode": 1, "stdout": "alpha\n"},
        {"stdout": ""},
        {"raises": subprocess.TimeoutExpired("scontrol", 30)},
        {"raises": FileNotFoundError("scontrol")},
    ],
)
def test_hostnames_falls_back_when_scontrol_fails(monkeypatch, kw):
    fake_scontrol(monkeypatch, **kw)
    assert hostnames("n[1-2]") == ["n1", "n2"]


def fake_dns(monkeypatch, table):
    def gethostbyname(host):
        if host in table:
            return table[host]
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "gethostbyname", gethostbyname)


def test_resolve_address_uses_dns_first(monkeypatch):
    fake_dns(monkeypatch, {"gpu01": "10.1.2.3"})
    calls = fake_scontrol(monkeypatch, stdout="NodeName=gpu01 NodeAddr=10.9.9.9")
    assert resolve_address("gpu01") == "10.1.2.3"
    assert calls == []


def test_resolve_address_falls_back_to_slurm_nodeaddr(monkeypatch):
    fake_dns(monkeypatch, {"10.4.5.6": "10.4.5.6", "gpu02-ib": "10.7.7.7"})
    calls = fake_scontrol(monkeypatch, stdout="NodeName=gpu02 Arch=x86_64\n   NodeAddr=10.4.5.6 NodeHostName=gpu02\n")
    assert resolve_address("gpu02") == "10.4.5.6"
    assert calls == [["/opt/slurm/bin/scontrol", "show", "node", "gpu02"]]
    fake_scontrol(monkeypatch, stdout="NodeName=gpu02 NodeAddr=gpu02-ib")
    assert resolve_address("gpu02") == "10.7.7.7"  # a NodeAddr that is a name is resolved in turn


@pytest.mark.parametrize(
    "kw", [{"returncode": 1}, {"stdout": "NodeName=gpu03 State=IDLE"}, {"stdout": "NodeName=gpu03 NodeAddr=nowhere"}]
)
def test_resolve_address_names_the_host_when_all_fails(monkeypatch, kw):
    fake_dns(monkeypatch, {})
    fake_scontrol(monkeypatch, **kw)
    with pytest.raises(ValueError, match="'gpu03'"):
        resolve_address("gpu03")


def test_resolve_address_without_scontrol(monkeypatch):
    fake_dns(monkeypatch, {})
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="cannot resolve host 'gpu04'"):
        resolve_address("gpu04")


def test_resolve_address_real_loopback():
    assert resolve_address("127.0.0.1") == "127.0.0.1"


# Expressions Slurm itself accepts (a suffix after the last bracket, as in "a[1-2].x", is not one).
SLURM_CHECKED = [
    "n1",
    "gpu[001-003]",
    "node[8-11]",
    "n[01-100]",
    "n[1-003]",
    "gpu[001-003,7]",
    "gpu[7,001-002]",
    "x1,y[2-3],z",
    "a[1-2],b[08-10,3],c",
    "r[1-2]n[01-02]",
    "a[1-2]b[1-2]c[5-6]",
    "a[1-2]b[3-4]c[5-6]d[7-8]",
    "rack[1-2]-n[3-4]",
    "n1,n1,n[1-2]",
    "n[1-3,2]",
    "n[7]",
]


@pytest.mark.slurm
@pytest.mark.parametrize("expr", SLURM_CHECKED)
def test_parser_agrees_with_scontrol(expr, slurm_env):
    out = subprocess.run(
        ["scontrol", "show", "hostnames", expr], capture_output=True, text=True, timeout=30, env=slurm_env
    )
    assert out.returncode == 0, out.stderr
    assert expand_nodelist(expr) == out.stdout.split()
