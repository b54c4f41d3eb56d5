/** The NBD export: NbdServer and its option types. */
export { NbdServer, type NbdListenAddress, type NbdServerOptions } from './server.js';
export type { ExportInfo, NbdExportOptions } from './export.js';
