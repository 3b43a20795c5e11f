#!/usr/bin/python3
"""Builds an XVA the way XAPI's stream_vdi.ml writes one, independently of diskstream.

Usage: make_xva.py SPEC.json OUT.xva

SPEC: {"vm": "name", "disks": [{"ref": "Ref:9", "path": "disk.raw", "size": N,
        "checksum": "xxhash"|"sha1", "keepalive": [chunk numbers], "name": "..."}],
       "extra_vdis": [{"ref": "Ref:77", "size": N}]}

Rules followed (stream_vdi.ml send_one / write_block, export.ml):
- ova.xml first: an XML-RPC struct {version, objects}; VDI objects carry virtual_size.
- disks in string order of their prefix (the VDI object id);
- 1 MiB members "%s/%08d", the last one shorter; each followed by its checksum member:
  "<name>.xxhash" = XXH64 seed 0 as %016X, or "<name>.checksum" = SHA-1 hex;
- all-zero chunks left out, except the first and the last;
- a keep-alive at chunk k: a zero-length member numbered k (with its checksum), after
  which the chunk at that offset is written with the next number;
- the tar end (two zero blocks; Python pads the record).
"""
import hashlib
import io
import json
import sys
import tarfile

import xxhash

CHUNK = 1024 * 1024


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o400
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def checksum(kind, data):
    if kind == "sha1":
        return ".checksum", hashlib.sha1(data).hexdigest()
    return ".xxhash", "%016X" % xxhash.xxh64(data, seed=0).intdigest()


def ova_xml(spec):
    def m(name, value):
        return "<member><name>%s</name><value>%s</value></member>" % (name, value)

    def obj(cls, ref, fields):
        return "<value><struct>%s%s%s</struct></value>" % (
            m("class", cls), m("id", ref), m("snapshot", "<struct>%s</struct>" % fields))

    version = "<struct>%s%s%s%s</struct>" % (
        m("hostname", "test-host"), m("product_brand", "XCP-ng"),
        m("product_version", "8.3.0"), m("export_vsn", "<i4>2</i4>"))
    objs = [obj("VM", "Ref:0", m("uuid", "11111111-2222-3333-4444-555555555555")
                + m("name_label", spec["vm"]) + m("is_a_snapshot", "<boolean>0</boolean>"))]
    vdis = spec["disks"] + spec.get("extra_vdis", [])
    for i, d in enumerate(vdis):
        objs.append(obj("VBD", "Ref:%d" % (100 + i), m("VM", "Ref:0") + m("VDI", d["ref"])
                        + m("userdevice", str(i)) + m("type", "Disk")))
        objs.append(obj("VDI", d["ref"], m("uuid", "uuid-%d" % i)
                        + m("name_label", d.get("name", "disk %d" % i))
                        + m("virtual_size", str(d["size"])) + m("type", "user")))
    return ("<value><struct>%s%s</struct></value>" % (
        m("version", version), m("objects", "<array><data>%s</data></array>" % "".join(objs))
    )).encode()


def send_disk(tar, d):
    size = d["size"]
    kind = d.get("checksum", "xxhash")
    keepalive = set(d.get("keepalive", []))
    with open(d["path"], "rb") as f:
        number = 0
        offset = 0
        while offset < size:
            this = min(CHUNK, size - offset)
            last = this == size - offset
            first_or_last = number == 0 or last
            name = "%s/%08d" % (d["ref"], number)
            if number in keepalive and not first_or_last:
                ext, csum = checksum(kind, b"")
                add(tar, name, b"")
                add(tar, name + ext, csum.encode())
                number += 1
                continue
            f.seek(offset)
            data = f.read(this)
            if len(data) < this:
                data += bytes(this - len(data))
            if first_or_last or any(data):
                ext, csum = checksum(kind, data)
                add(tar, name, data)
                add(tar, name + ext, csum.encode())
            number += 1
            offset += CHUNK


def main():
    spec = json.load(open(sys.argv[1]))
    with tarfile.open(sys.argv[2], "w", format=tarfile.USTAR_FORMAT) as tar:
        add(tar, "ova.xml", ova_xml(spec))
        for d in sorted(spec["disks"], key=lambda d: d["ref"]):
            send_disk(tar, d)


main()
