/**
 * diskstream: stream virtual disks. Export a raw disk or block device as a qcow2
 * (or VHD) stream without a temporary file, import a qcow2/VHD stream into a raw file or block
 * device without seeking, diff against a base disk, and read image headers to list the
 * allocated clusters.
 *
 * @example Parse a size and format allocation JSON
 * ```ts
 * import { ClusterSet, formatAllocation, parseSize } from "@diskstream/diskstream";
 * import assert from "node:assert/strict";
 *
 * const clusters = new ClusterSet(16, parseSize("2M"));
 * clusters.addRange(0, 2);
 * assert.equal(
 *   formatAllocation({ virtualSize: parseSize("32M"), clusters }),
 *   '{"virtual_size":33554432,"cluster_bits":21,"data_clusters":[[0,2]]}',
 * );
 * ```
 * @module
 */

// Foundation: errors, sizes, cluster sets, allocation JSON, progress.
export {
  BrokenPipeError,
  CorruptImageError,
  DiskstreamError,
  InterruptedError,
  LimitError,
  NbdError,
  PermissionError,
  SourceChangedError,
  UnsupportedError,
  UsageError,
} from "./lib/errors.ts";
export { formatBytes, parseSize } from "./lib/size.ts";
export { ClusterSet } from "./lib/alloc/cluster_set.ts";
export {
  type Allocation,
  AllocationJsonError,
  formatAllocation,
  type ImageInfoJson,
  parseAllocation,
} from "./lib/alloc/allocation.ts";
export { createProgress, type ProgressMode, type ProgressSink } from "./lib/progress.ts";

// Export (raw → qcow2 or VHD stream).
export {
  type ExportOptions,
  exportQcow2,
  type PlannedExport,
  type Qcow2Export,
  type StreamExportOptions,
} from "./lib/export/export.ts";
export { exportVhd, type VhdExport, type VhdExportOptions } from "./lib/export/vhd.ts";
export type { Endpoint } from "./lib/io/stream.ts";
export type { StreamLayout } from "./lib/qcow2/layout.ts";
export type { VhdFooterFields, VhdLayout } from "./lib/vhd/writer.ts";
export { resolveAllocationSpec } from "./lib/headers/allocation_spec.ts";

// Headers and info.
export { readImageAllocation } from "./lib/headers/image_allocation.ts";
export {
  formatImageInfo,
  type ImageInfo,
  type LayerInfo,
  type Qcow2InfoJson,
  readImageInfo,
  type VhdInfoJson,
} from "./lib/headers/info.ts";
export {
  buildVhdFooter,
  parseVhdFooter,
  type VhdFooter,
  type VhdFooterOptions,
} from "./lib/vhd/footer.ts";
export {
  buildVhdDynamicHeader,
  parseVhdDynamicHeader,
  type VhdDynamicHeader,
  type VhdDynamicHeaderOptions,
  type VhdParentLocator,
} from "./lib/vhd/dynamic_header.ts";

// Import (qcow2/VHD stream → raw).
export {
  DEFAULT_MAX_BUFFER,
  type ImportFormat,
  importImage,
  type ImportOptions,
  type ImportResult,
} from "./lib/import/import.ts";
export type { DestinationKind, DestinationOptions } from "./lib/import/raw_destination.ts";

// NBD (nbd://, nbds://, nbd+unix:// sources, bases, destinations and allocations).
export { isNbdUri, type NbdAddress, parseNbdUri } from "./lib/nbd/uri.ts";
export { DEFAULT_CONNECTIONS, NbdExport, type NbdOptions } from "./lib/nbd/client.ts";
export { nbdAllocation } from "./lib/nbd/allocation.ts";

// XAPI's wire formats: raw, vhd-tool's chunked protocol, XVA disk members in tar.
export {
  type ChunkedExportOptions,
  exportChunked,
  exportRaw,
  exportTar,
  type TarExportOptions,
  type WireExport,
  type WireLayout,
} from "./lib/export/wire.ts";
export {
  importChunked,
  importRaw,
  importTar,
  type TarImportOptions,
  type WireImportOptions,
  type WireImportResult,
} from "./lib/import/wire.ts";
export { type ChecksumKind, loadChecksum } from "./lib/xva/checksum.ts";
export { type OvaManifest, parseOvaXml, type XvaDisk, type XvaVm } from "./lib/xva/ova.ts";
export { listXvaFile, listXvaStream, type XvaDiskListing, type XvaListing } from "./lib/xva/xva.ts";
export {
  extractXva,
  type XvaExtracted,
  type XvaExtractOptions,
  type XvaExtractResult,
} from "./lib/import/xva.ts";
export { extractXvaFileAs, type XvaConvertOptions } from "./lib/export/xva.ts";
export { XvaDiskSource, type XvaMemberRange } from "./lib/xva/disk_source.ts";
// HTTP(S): the client (export -o URL, import -i URL) and the disk server.
export {
  type HttpClientOptions,
  type HttpDownload,
  httpGet,
  httpPut,
  type HttpPutOptions,
  HttpStatusError,
  HttpTransferError,
  parseHeaderLines,
  redactUrl,
} from "./lib/http/client.ts";
export {
  contentTypeOf,
  FORMAT_CONTENT_TYPES,
  formatOfContentType,
} from "./lib/http/content_type.ts";
export {
  type DiskServer,
  type DiskServerOptions,
  type ServedExport,
  type ServedImport,
  SERVER_FORMATS,
  type ServerFormat,
  startDiskServer,
} from "./lib/server/server.ts";
