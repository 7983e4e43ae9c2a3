// A message as it is received, before the host knows whether it must be spooled: in memory, then
// in the spool's tmp/, and committed into queue/ only if LMTP cannot take it now.

import { open, rm, type FileHandle } from "node:fs/promises";
import { HEADER_END, HEADER_RESERVED, SpoolWriteError, encodeHeader, writeFully, type SpoolHeader } from "./spool-file.ts";
import type { Spool } from "./spool.ts";

/** How much of a message is held in memory before it goes to tmp/ (per delivery under way). */
export const HELD_BYTES = 1024 * 1024;

/** How a StagedMessage opens its file (node:fs/promises' open; tests hand in a faulty one). */
export type OpenFile = (path: string, flags: string, mode: number) => Promise<FileHandle>;

/**
 * A message being received, before the host tries LMTP, kept so that it can be spooled if LMTP
 * fails. The first HELD_BYTES stay in memory; a larger message goes on into tmp/<id> as it
 * arrives (memory stays bounded). Most messages are delivered at once and small, so most never
 * touch the disk here. content() gives the bytes back for LMTP; commit() makes them durable and
 * visible in queue/; discard() forgets them.
 */
export class StagedMessage {
  private bytes = 0;
  private phase: Phase = { is: "held", chunks: [] };
  private ready: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly spool: Spool,
    readonly id: string,
    private readonly path: string,
    private readonly openFile: OpenFile = open,
  ) {}

  /** Appends a chunk (in order). A write error is remembered and surfaces at commit(). */
  write(chunk: Uint8Array): Promise<void> {
    const at = HEADER_RESERVED + this.bytes;
    this.bytes += chunk.byteLength;
    if (this.phase.is === "held" && this.bytes <= HELD_BYTES) {
      this.phase.chunks.push(chunk);
      return this.ready as Promise<void>;
    }
    const p = this.ready.then(async () => {
      if (this.phase.is !== "held" && this.phase.is !== "writing") return; // failed, or over
      try {
        await writeFully(await this.file(), chunk, at);
      } catch (e) {
        this.phase = { is: "failed", error: e as Error, fh: this.phase.is === "writing" ? this.phase.fh : null };
      }
    });
    this.ready = p;
    return p;
  }

  /** tmp/<id>, created on first need with what was held so far. */
  private async file(): Promise<FileHandle> {
    if (this.phase.is === "writing") return this.phase.fh;
    if (this.phase.is !== "held") throw new SpoolWriteError(`spool file already ${this.phase.is}`);
    const held = this.phase.chunks;
    let fh: FileHandle;
    try {
      fh = await this.openFile(this.path, "wx", 0o600);
    } catch (e) {
      throw new SpoolWriteError(`spool not writable: ${(e as Error).message}`);
    }
    this.phase = { is: "writing", fh };
    let at = HEADER_RESERVED;
    for (const c of held) {
      await writeFully(fh, c, at);
      at += c.byteLength;
    }
    return fh;
  }

  get size(): number {
    return this.bytes;
  }

  /**
   * Everything written so far, for LMTP: the bytes themselves when they are held in memory,
   * otherwise a stream of them from tmp/. A message that could not be written to tmp/ cannot be
   * delivered either (it is not held anywhere): SpoolWriteError.
   */
  async content(): Promise<Uint8Array | ReadableStream<Uint8Array>> {
    await this.ready;
    if (this.phase.is === "failed") throw new SpoolWriteError(`spool write failed: ${this.phase.error.message}`);
    if (this.phase.is === "held") return this.phase.chunks.length === 1 ? this.phase.chunks[0]! : Buffer.concat(this.phase.chunks);
    return Bun.file(this.path).slice(HEADER_RESERVED, HEADER_RESERVED + this.bytes).stream();
  }

  /** Durable from here on: only now may the sender be told 2xx. */
  async commit(meta: Omit<SpoolHeader, "id" | "size">): Promise<SpoolHeader> {
    await this.ready;
    if (this.phase.is === "failed") {
      const { error } = this.phase;
      await this.discard();
      throw new SpoolWriteError(`spool write failed: ${error.message}`);
    }
    const header: SpoolHeader = { id: this.id, size: this.bytes, ...meta };
    try {
      const line = encodeHeader(header);
      const fh = await this.file();
      await writeFully(fh, line, 0);
      await writeFully(fh, HEADER_END, HEADER_RESERVED - 1);
      await fh.sync();
      this.phase = { is: "closed" };
      await fh.close();
      await this.spool.publish(this.path, this.id);
      this.phase = { is: "committed" };
    } catch (e) {
      await this.discard();
      throw new SpoolWriteError(`spool write failed: ${(e as Error).message}`);
    }
    return header;
  }

  /** Forgets the message (never acknowledged). After a commit there is nothing to discard. */
  async discard(): Promise<void> {
    await this.ready;
    const was = this.phase;
    if (was.is === "committed" || was.is === "discarded") return;
    this.phase = { is: "discarded" };
    const fh = was.is === "writing" || was.is === "failed" ? was.fh : null;
    if (fh) await fh.close().catch(() => {});
    // Nothing reached the disk while the message was held, or when tmp/<id> could not be opened.
    if (was.is === "held" || (was.is === "failed" && !fh)) return;
    await rm(this.path, { force: true }).catch(() => {});
  }
}

/**
 * Where a StagedMessage is: held in memory (the first HELD_BYTES), then written to tmp/<id>
 * (the file open), "failed" once a write did not complete (only discard() is left), "closed"
 * while commit() publishes the fsynced file, and at last committed or discarded.
 */
type Phase =
  | { is: "held"; chunks: Uint8Array[] }
  | { is: "writing"; fh: FileHandle }
  | { is: "failed"; error: Error; fh: FileHandle | null }
  | { is: "closed" }
  | { is: "committed" }
  | { is: "discarded" };
