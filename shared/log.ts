// The log: one JSON object per line on stdout, on both runtimes. The access log (middleware/
// access-log.ts) writes one line per request; everything else writes event lines through stamped().

export type LogLine = Record<string, unknown>;
export type LogWriter = (line: LogLine) => void;

export const jsonLines: LogWriter = (line) => console.log(JSON.stringify(line));

/** A writer whose every line starts with the time it was written. */
export function stamped(write: LogWriter): LogWriter {
  return (line) => write({ time: new Date().toISOString(), ...line });
}
