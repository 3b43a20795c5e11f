/**
 * `ova.xml`, the first member of an XVA: an XML-RPC struct `{version, objects}` (XAPI's
 * `export.ml`). Each object is `{class, id, snapshot}`; the VDI objects carry the
 * disks' `uuid`, `name_label` and `virtual_size`, the VBDs say which VM uses which
 * VDI. The XML is parsed by the `fast-xml-parser` package; XML-RPC values are decoded
 * here.
 *
 * @module
 */
import { XMLParser } from "fast-xml-parser";
import { CorruptImageError, escapeControls } from "../errors.ts";

/** An XML-RPC value. */
export type XmlRpcValue =
  | string
  | number
  | boolean
  | null
  | XmlRpcValue[]
  | { [key: string]: XmlRpcValue };

/** A disk of an XVA, from its VDI object. */
export interface XvaDisk {
  /** The VDI object's id, the prefix of its members (`Ref:175`). */
  ref: string;
  uuid: string | null;
  name: string | null;
  /** Bytes. */
  virtualSize: number;
  /** The VDI's type (`user`, `system`, `suspend`, ...). */
  type: string | null;
  /** The devices the VM sees it as (VBD `userdevice`), when a VBD names it. */
  devices: string[];
}

/** A VM of an XVA. */
export interface XvaVm {
  ref: string;
  uuid: string | null;
  name: string | null;
  isSnapshot: boolean;
}

/** What `ova.xml` says. */
export interface OvaManifest {
  /** The `version` struct (hostname, product_version, export_vsn, ...). */
  version: Record<string, XmlRpcValue>;
  vms: XvaVm[];
  /** The VDI objects, in the order of their ids (the order of their members). */
  disks: XvaDisk[];
}

type Node = Record<string, unknown>;

const parser = new XMLParser({
  preserveOrder: true,
  ignoreAttributes: true,
  parseTagValue: false,
  trimValues: false,
  htmlEntities: true, // numeric character references (&#233;) too, not only &amp; and co.
});

function children(node: Node, tag: string): Node[] {
  return (node[tag] as Node[] | undefined) ?? [];
}

function tagOf(node: Node): string {
  return Object.keys(node).find((k) => k !== ":@") ?? "";
}

function textOf(nodes: Node[]): string {
  return nodes.map((n) => (typeof n["#text"] === "string" ? n["#text"] : "")).join("");
}

function decodeValue(value: Node[]): XmlRpcValue {
  const typed = value.find((n) => tagOf(n) !== "#text");
  if (!typed) return textOf(value); // <value>text</value> is a string
  const tag = tagOf(typed);
  const inner = children(typed, tag);
  switch (tag) {
    case "string":
    case "dateTime.iso8601":
    case "base64":
      return textOf(inner);
    case "i4":
    case "i8":
    case "int":
    case "double":
      return Number(textOf(inner).trim());
    case "boolean":
      return textOf(inner).trim() === "1";
    case "nil":
      return null;
    case "array": {
      const data = inner.find((n) => tagOf(n) === "data");
      return data
        ? children(data, "data").filter((n) => tagOf(n) === "value").map((n) =>
          decodeValue(children(n, "value"))
        )
        : [];
    }
    case "struct": {
      const out: Record<string, XmlRpcValue> = {};
      for (const member of inner.filter((n) => tagOf(n) === "member")) {
        const parts = children(member, "member");
        const name = parts.find((n) => tagOf(n) === "name");
        const value = parts.find((n) => tagOf(n) === "value");
        if (name && value) {
          out[textOf(children(name, "name"))] = decodeValue(children(value, "value"));
        }
      }
      return out;
    }
    default:
      return textOf(inner);
  }
}

/**
 * Decodes an XML-RPC document whose root is `<value>` (as `ova.xml`) or a
 * `<methodResponse>`/`<methodCall>` holding values.
 *
 * @example
 * ```ts
 * import { parseXmlRpc } from "./ova.ts";
 * import assert from "node:assert/strict";
 *
 * const xml = "<value><struct><member><name>a</name><value>x</value></member>" +
 *   "<member><name>b</name><value><array><data><value><i4>7</i4></value></data></array>" +
 *   "</value></member></struct></value>";
 * assert.deepEqual(parseXmlRpc(xml), { a: "x", b: [7] });
 * ```
 */
export function parseXmlRpc(xml: string): XmlRpcValue {
  let doc: Node[];
  try {
    doc = parser.parse(xml) as Node[];
  } catch (err) {
    throw new CorruptImageError(
      `ova.xml is not valid XML: ${escapeControls((err as Error).message).slice(0, 300)}`,
    );
  }
  const root = doc.find((n) => tagOf(n) === "value");
  if (!root) throw new CorruptImageError("ova.xml holds no XML-RPC <value> at its root");
  return decodeValue(children(root, "value"));
}

function str(v: XmlRpcValue | undefined): string | null {
  return typeof v === "string" ? v : typeof v === "number" ? String(v) : null;
}

/**
 * Reads `ova.xml`: the version, the VMs and the disks (VDI objects), with the
 * devices their VBDs give them. Refuses a document without `objects` or a VDI
 * without a usable `virtual_size`.
 *
 * @example
 * ```ts
 * import { parseOvaXml } from "./ova.ts";
 * import assert from "node:assert/strict";
 *
 * const m = (n: string, v: string) => `<member><name>${n}</name><value>${v}</value></member>`;
 * const obj = (cls: string, id: string, fields: string) =>
 *   `<value><struct>${m("class", cls)}${m("id", id)}${m("snapshot", `<struct>${fields}</struct>`)}</struct></value>`;
 * const xml = `<value><struct>${m("version", `<struct>${m("export_vsn", "<i4>2</i4>")}</struct>`)}` +
 *   m("objects", "<array><data>" +
 *     obj("VM", "Ref:0", m("name_label", "web") + m("is_a_snapshot", "<boolean>0</boolean>")) +
 *     obj("VBD", "Ref:1", m("VM", "Ref:0") + m("VDI", "Ref:2") + m("userdevice", "0")) +
 *     obj("VDI", "Ref:2", m("name_label", "root") + m("virtual_size", "10737418240")) +
 *     "</data></array>") + "</struct></value>";
 * const ova = parseOvaXml(xml);
 * assert.equal(ova.vms[0].name, "web");
 * assert.deepEqual(ova.disks.map((d) => [d.ref, d.name, d.virtualSize, d.devices]), [
 *   ["Ref:2", "root", 10737418240, ["0"]],
 * ]);
 * ```
 */
export function parseOvaXml(xml: string): OvaManifest {
  const top = parseXmlRpc(xml);
  if (
    top === null || typeof top !== "object" || Array.isArray(top) || !Array.isArray(top.objects)
  ) {
    throw new CorruptImageError("ova.xml has no list of objects: not an XVA's ova.xml");
  }
  const version = top.version && typeof top.version === "object" && !Array.isArray(top.version)
    ? top.version as Record<string, XmlRpcValue>
    : {};
  const vms: XvaVm[] = [];
  const disks = new Map<string, XvaDisk>(); // by ref: ova.xml may hold many objects
  const vbds: Record<string, XmlRpcValue>[] = [];
  for (const o of top.objects) {
    if (o === null || typeof o !== "object" || Array.isArray(o)) continue;
    const snap = o.snapshot;
    if (snap === null || typeof snap !== "object" || Array.isArray(snap)) continue;
    const ref = str(o.id) ?? "";
    if (o.class === "VM") {
      vms.push({
        ref,
        uuid: str(snap.uuid),
        name: str(snap.name_label),
        isSnapshot: snap.is_a_snapshot === true,
      });
    } else if (o.class === "VBD") {
      vbds.push(snap);
    } else if (o.class === "VDI") {
      if (ref === "") throw new CorruptImageError("ova.xml holds a VDI object without an id");
      if (disks.has(ref)) {
        throw new CorruptImageError(
          `ova.xml holds two VDI objects with the id ${escapeControls(ref)}`,
        );
      }
      // A decimal count of bytes (XAPI writes an int64 as a string); no "", hex or 1e9.
      const text = str(snap.virtual_size)?.trim() ?? "";
      const size = /^\d{1,16}$/.test(text) ? Number(text) : NaN;
      if (!Number.isSafeInteger(size)) {
        throw new CorruptImageError(
          `ova.xml gives VDI ${escapeControls(ref)} no usable virtual_size (${
            escapeControls(JSON.stringify(snap.virtual_size ?? null).slice(0, 100))
          }): a decimal number of bytes is expected`,
        );
      }
      disks.set(ref, {
        ref,
        uuid: str(snap.uuid),
        name: str(snap.name_label),
        virtualSize: size,
        type: str(snap.type),
        devices: [],
      });
    }
  }
  for (const vbd of vbds) {
    const disk = disks.get(str(vbd.VDI) ?? "");
    const dev = str(vbd.userdevice) ?? str(vbd.device);
    if (disk && dev !== null) disk.devices.push(dev);
  }
  const sorted = [...disks.values()].sort((a, b) => (a.ref < b.ref ? -1 : a.ref > b.ref ? 1 : 0));
  return { version, vms, disks: sorted };
}
