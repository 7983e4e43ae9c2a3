// Prometheus' text format (version 0.0.4): the host's GET /metrics and the Worker's /edge/metrics.

export const PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4";

/** One metric as its three lines: what it is, its type, its value. */
export function metric(name: string, type: "counter" | "gauge", help: string, value: number | string): string[] {
  return [`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, `${name} ${value}`];
}
