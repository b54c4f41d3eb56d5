/**
 * The socket ends of `spindle system` and `spindle daemon` (-qmp, -chardev socket, -qtest):
 * connect to a listener (QEMU's default) or listen for connections, on a UNIX socket or TCP.
 */
import { unlinkSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { CliError } from './fail.js';
import { socketName, type SocketSpec } from './system/args.js';

/** `onSocket` gets each connection; resolves with what closes the end. */
export async function socketEnd(spec: SocketSpec, what: string, onSocket: (s: Socket) => void): Promise<() => void> {
  const name = socketName(spec);
  if (!spec.server) {
    return new Promise((resolve, reject) => {
      const s = spec.kind === 'unix' ? connect(spec.path) : connect(spec.port, spec.host);
      s.once('error', (e) => reject(new CliError(`${what}: Failed to connect to '${name}': ${e.message}`)));
      s.once('connect', () => {
        onSocket(s);
        resolve(() => s.destroy());
      });
    });
  }
  if (spec.kind === 'unix') {
    try {
      unlinkSync(spec.path);
    } catch {
      // nothing there
    }
  }
  const srv = createServer(onSocket);
  await new Promise<void>((resolve, reject) => {
    srv.once('error', (e) => reject(new CliError(`${what}: Failed to listen on '${name}': ${e.message}`)));
    if (spec.kind === 'unix') srv.listen(spec.path, () => resolve());
    else srv.listen(spec.port, spec.host, () => resolve());
  });
  return () => void srv.close();
}
