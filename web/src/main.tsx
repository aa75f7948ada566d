import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { ApiError, errorText, get, getToken, setToken } from "./api";
import { ActivityView, ClusterView, VmsView } from "./views";
import { VmDetail } from "./detail";
import type { MigrationRecord, NodeView, VmRecord } from "./types";
import "./style.css";

export interface Snapshot {
  nodes: NodeView[];
  vms: VmRecord[];
  migrations: MigrationRecord[];
  at: number;
}

export interface Action {
  at: number;
  text: string;
  ok: boolean;
}

function useRoute(): string[] {
  const read = () => location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const [r, setR] = useState(read());
  useEffect(() => {
    const f = () => setR(read());
    addEventListener("hashchange", f);
    return () => removeEventListener("hashchange", f);
  }, []);
  return r;
}

function Login(props: { onDone: () => void; error: string | null }) {
  const [token, setT] = useState("");
  const [err, setErr] = useState<string | null>(props.error);
  const submit = async (e: Event) => {
    e.preventDefault();
    setToken(token.trim());
    try {
      await get("/v1/vms");
      props.onDone();
    } catch (x) {
      setToken(null);
      setErr(errorText(x));
    }
  };
  return (
    <main class="login">
      <h1>Ferry cluster console</h1>
      <form onSubmit={submit}>
        <label>
          API token
          <input
            data-testid="token"
            type="password"
            autocomplete="off"
            value={token}
            onInput={(e) => setT((e.target as HTMLInputElement).value)}
          />
        </label>
        <button data-testid="login" type="submit">
          Sign in
        </button>
        <p class="hint">
          A token from <code>ferry token issue</code>, or a client certificate of the cluster CA
          installed in this browser (then no token is needed).
        </p>
        {err && (
          <p class="error" data-testid="login-error">
            {err}
          </p>
        )}
      </form>
    </main>
  );
}

function App() {
  const route = useRoute();
  const [authed, setAuthed] = useState<boolean | null>(null);
  const [authErr, setAuthErr] = useState<string | null>(null);
  const [snap, setSnap] = useState<Snapshot | null>(null);
  const [stale, setStale] = useState<string | null>(null);
  const [actions, setActions] = useState<Action[]>([]);
  const log = (text: string, ok = true) =>
    setActions((a) => [{ at: Date.now(), text, ok }, ...a].slice(0, 200));

  useEffect(() => {
    get("/v1/vms")
      .then(() => setAuthed(true))
      .catch((e) => {
        setAuthed(false);
        if (!(e instanceof ApiError && e.status === 401) || getToken()) setAuthErr(String(e.message));
      });
  }, []);

  const refresh = async () => {
    try {
      const [nodes, vms, migrations] = await Promise.all([
        get<NodeView[]>("/v1/nodes"),
        get<VmRecord[]>("/v1/vms"),
        get<MigrationRecord[]>("/v1/migrations"),
      ]);
      setSnap({ nodes, vms, migrations, at: Date.now() });
      setStale(null);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) setAuthed(false);
      setStale(String((e as Error).message));
    }
  };

  useEffect(() => {
    if (!authed) return;
    refresh();
    const t = setInterval(refresh, 1000);
    return () => clearInterval(t);
  }, [authed]);

  if (authed === null) return <p class="loading">connecting…</p>;
  if (!authed) return <Login error={authErr} onDone={() => setAuthed(true)} />;

  const [page, arg, sub] = route;
  let body;
  if (!snap) body = <p class="loading">loading…</p>;
  else if (page === "vms") body = <VmsView snap={snap} log={log} refresh={refresh} />;
  else if (page === "vm" && arg)
    body = <VmDetail name={arg} editing={sub === "edit"} snap={snap} log={log} refresh={refresh} />;
  else if (page === "activity") body = <ActivityView snap={snap} actions={actions} />;
  else body = <ClusterView snap={snap} log={log} refresh={refresh} />;

  const tab = (href: string, label: string, on: boolean) => (
    <a href={href} class={on ? "on" : ""} data-testid={`nav-${label.toLowerCase()}`}>
      {label}
    </a>
  );
  return (
    <>
      <header>
        <strong>Ferry</strong>
        <nav>
          {tab("#/", "Cluster", !page)}
          {tab("#/vms", "VMs", page === "vms" || page === "vm")}
          {tab("#/activity", "Activity", page === "activity")}
        </nav>
        <span class="grow" />
        {stale && (
          <span class="stale" title={stale}>
            agent not answering: data may be stale
          </span>
        )}
        {getToken() && (
          <button
            class="link"
            onClick={() => {
              setToken(null);
              setAuthed(false);
            }}
          >
            sign out
          </button>
        )}
      </header>
      <main>{body}</main>
    </>
  );
}

render(<App />, document.getElementById("app")!);
