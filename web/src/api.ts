// The agent API from the browser: same origin, the credential (a bearer token kept in this
// tab's sessionStorage, or the browser's client certificate) on every call.
import type { MigrationEvent } from "./types";

const TOKEN_KEY = "ferry-token";

export class ApiError extends Error {
  constructor(
    public status: number,
    message: string,
  ) {
    super(message);
  }
}

/** An error as the page shows it: the agent's own message for an API error. */
export function errorText(e: unknown): string {
  return e instanceof ApiError ? e.message : String(e);
}

export function getToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(t: string | null) {
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(json: boolean): Record<string, string> {
  const h: Record<string, string> = {};
  const t = getToken();
  if (t) h["Authorization"] = `Bearer ${t}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

export async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  let r: Response;
  try {
    r = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
  } catch (e) {
    throw new ApiError(0, `the agent does not answer: ${e}`);
  }
  const text = await r.text();
  if (!r.ok) {
    let msg = text;
    try {
      msg = JSON.parse(text).error ?? text;
    } catch {
      /* not JSON */
    }
    throw new ApiError(r.status, msg || `HTTP ${r.status}`);
  }
  return JSON.parse(text) as T;
}

export const get = <T>(path: string) => call<T>("GET", path);
export const post = <T>(path: string, body: unknown = {}) => call<T>("POST", path, body);
export const put = <T>(path: string, body: unknown) => call<T>("PUT", path, body);
export const del = <T>(path: string) => call<T>("DELETE", path);

/** Splits a server-sent event stream's text into complete `data:` payloads; returns them and
 * the incomplete rest. */
export function splitEvents(buffer: string): { events: string[]; rest: string } {
  const events: string[] = [];
  const blocks = buffer.split(/\r?\n\r?\n/);
  const rest = blocks.pop() ?? "";
  for (const b of blocks) {
    const data = b
      .split(/\r?\n/)
      .filter((l) => l.startsWith("data:"))
      .map((l) => l.slice(5).trimStart())
      .join("\n");
    if (data) events.push(data);
  }
  return { events, rest };
}

/** Follows `GET /v1/migrations/{id}/events` (fetch, so the token header goes with it) until
 * `done`/`error` or `signal` aborts. */
export async function followMigration(
  id: string,
  onEvent: (e: MigrationEvent) => void,
  signal: AbortSignal,
): Promise<void> {
  const r = await fetch(`/v1/migrations/${encodeURIComponent(id)}/events`, {
    headers: headers(false),
    signal,
  });
  if (!r.ok || !r.body) {
    const text = await r.text();
    let msg = text;
    try {
      msg = JSON.parse(text).error ?? text;
    } catch {
      /* not JSON */
    }
    throw new ApiError(r.status, msg);
  }
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    const { events, rest } = splitEvents(buf);
    buf = rest;
    for (const e of events) {
      const ev = JSON.parse(e) as MigrationEvent;
      onEvent(ev);
      if (ev.event !== "progress") {
        reader.cancel().catch(() => {});
        return;
      }
    }
  }
}
