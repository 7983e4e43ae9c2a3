// One socket to the LMTP server, TCP or unix: commands and message bytes out, whole replies in,
// every wait with its limit. A wait that runs out, a closed socket or bytes that are not replies
// break the socket for good, and every wait on it fails with that fault.

import type { Socket } from "bun";
import { BodyAborted, LmtpFault, type LmtpPhase } from "./faults.ts";
import { ReplyParser, type LmtpReply } from "./replies.ts";
import { describeTarget, protocolOf, type LmtpTarget } from "./target.ts";
import { within, type LmtpTimeouts } from "./timeouts.ts";

type Waiter = { resolve: (r: LmtpReply) => void; reject: (e: Error) => void };

const encoder = new TextEncoder();

export class LmtpSocket {
  private fault: Error | null = null;
  private socket!: Socket<undefined>;
  private readonly parser = new ReplyParser();
  private readonly replies: LmtpReply[] = [];
  private readonly waiters: Waiter[] = [];
  private drainWaiter: (() => void) | null = null;
  /** "LMTP" or "SMTP", for the faults' words. */
  private name = "LMTP";

  private constructor(private readonly timeouts: LmtpTimeouts) {}

  /** Connects within timeouts.connect, cut to the deadline (performance.now() time). */
  static async connect(target: LmtpTarget, timeouts: LmtpTimeouts, deadline: number): Promise<LmtpSocket> {
    const s = new LmtpSocket(timeouts);
    await s.connect(target, deadline);
    return s;
  }

  /** Set once the socket can no longer be trusted. */
  get broken(): Error | null {
    return this.fault;
  }

  /** No reply waiting that nobody asked for. */
  get inStep(): boolean {
    return this.replies.length === 0;
  }

  private async connect(target: LmtpTarget, deadline: number): Promise<void> {
    this.name = protocolOf(target).toUpperCase();
    const lost = (e: Error) => this.close(e instanceof LmtpFault ? e : new LmtpFault("closed", null, e.message));
    const handlers = {
      data: (_s: Socket<undefined>, chunk: Uint8Array) => {
        try {
          for (const r of this.parser.push(chunk)) this.replies.push(r);
        } catch (e) {
          return lost(e as Error);
        }
        while (this.waiters.length && this.replies.length) this.waiters.shift()!.resolve(this.replies.shift()!);
      },
      drain: () => {
        const w = this.drainWaiter;
        this.drainWaiter = null;
        w?.();
      },
      close: () => this.close(new LmtpFault("closed", null, `${this.name} server closed the connection`)),
      end: () => this.close(new LmtpFault("closed", null, `${this.name} server closed the connection`)),
      error: (_s: Socket<undefined>, e: Error) => lost(e),
    };
    const where = describeTarget(target);
    const connecting =
      target.kind === "unix"
        ? Bun.connect({ unix: target.path, socket: handlers })
        : Bun.connect({ hostname: target.host, port: target.port, socket: handlers });
    let timer: Timer | undefined;
    const timeout = new Promise<never>((_, reject) => {
      const ms = within(this.timeouts.connect, deadline);
      timer = setTimeout(() => reject(new LmtpFault("timeout", "connect", `${this.name} connect to ${where} timed out after ${ms} ms`)), ms);
    });
    try {
      this.socket = await Promise.race([connecting, timeout]);
    } catch (e) {
      // A connect that completes after the timeout must not leak a socket.
      connecting.then((s) => s.terminate(), () => {});
      if (e instanceof LmtpFault) throw e;
      throw new LmtpFault("connect", "connect", `${this.name} connect to ${where} failed: ${(e as Error).message}`);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Breaks the socket for good (the first reason stays) and wakes everyone waiting on it. */
  close(reason: Error = new Error("closed")): void {
    if (this.fault) return;
    this.fault = reason;
    for (const w of this.waiters.splice(0)) w.reject(reason);
    this.drainWaiter?.();
    this.socket?.terminate();
  }

  send(line: string): void {
    // Commands are short; they fit the socket buffer unless the server stopped reading, in which
    // case the next read times out and the connection is dropped.
    const bytes = encoder.encode(line);
    const n = this.socket.write(bytes);
    if (n < bytes.length) void this.write(bytes.subarray(Math.max(n, 0)), Infinity).catch(() => {});
  }

  async write(bytes: Uint8Array, deadline: number): Promise<void> {
    let off = 0;
    while (off < bytes.length) {
      if (this.broken) throw this.faultFrom(this.broken, "body");
      const n = this.socket.write(bytes.subarray(off));
      if (n < 0) throw new LmtpFault("closed", "body", `${this.name} socket closed while writing`);
      off += n;
      if (off < bytes.length) await this.waitDrain(deadline);
    }
  }

  private waitDrain(deadline: number): Promise<void> {
    const ms = within(this.timeouts.body, deadline);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const e = new LmtpFault("timeout", "body", `${this.name} server did not take message data for ${ms} ms`);
        this.close(e);
        reject(e);
      }, ms);
      this.drainWaiter = () => {
        clearTimeout(timer);
        this.broken ? reject(this.faultFrom(this.broken, "body")) : resolve();
      };
    });
  }

  read(phase: LmtpPhase, phaseMs: number, deadline: number): Promise<LmtpReply> {
    const queued = this.replies.shift();
    if (queued) return Promise.resolve(queued);
    if (this.broken) return Promise.reject(this.faultFrom(this.broken, phase));
    const ms = within(phaseMs, deadline);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const e = new LmtpFault("timeout", phase, `no ${this.name} reply to ${phase.toUpperCase()} within ${ms} ms`);
        this.close(e);
        reject(e);
      }, ms);
      this.waiters.push({
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(this.faultFrom(e, phase));
        },
      });
    });
  }

  /** Labels a fault of the socket (or its phase-free cause) with the phase that was waiting on it. */
  private faultFrom(e: Error, phase: LmtpPhase): Error {
    if (e instanceof LmtpFault) return e.phase === phase || e.kind === "timeout" ? e : new LmtpFault(e.kind, phase, e.message);
    if (e instanceof BodyAborted) return e;
    return new LmtpFault("closed", phase, e.message);
  }
}
