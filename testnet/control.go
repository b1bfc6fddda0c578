package testnet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// ErrNoTestnet means no running testnet answers in a directory.
var ErrNoTestnet = errors.New("no testnet running")

// ControlSocket is where a running `signal testnet` listens for the
// commands of `signal testnet node ...`: a unix socket (mode 0600) in its
// directory, so that only its owner can kill and restart its members.
func ControlSocket(dir string) string { return filepath.Join(dir, "run", "control.sock") }

// ServeControl answers control commands on ControlSocket until ctx ends:
// GET /nodes lists the node members, POST /nodes/{n}/kill kills node n
// (SIGKILL, as a machine dies) and POST /nodes/{n}/restart starts it
// again, answering once the coordinators list it.
func (t *Processes) ServeControl(ctx context.Context) error {
	path := ControlSocket(t.plan.dir)
	_ = os.Remove(path) // the directory is held: a socket there is a dead one's
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("testnet control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = ln.Close()
		return fmt.Errorf("testnet control socket: %w", err)
	}
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, v any, err error) {
		w.Header().Set("Content-Type", "application/json")
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			v = map[string]string{"error": err.Error()}
		}
		_ = json.NewEncoder(w).Encode(v)
	}
	mux.HandleFunc("GET /nodes", func(w http.ResponseWriter, r *http.Request) { reply(w, t.NodeStatuses(), nil) })
	mux.HandleFunc("POST /nodes/{n}/{action}", func(w http.ResponseWriter, r *http.Request) {
		i, err := parseNode(r.PathValue("n"))
		if err != nil {
			reply(w, nil, err)
			return
		}
		switch r.PathValue("action") {
		case "kill":
			if err := t.KillNode(i); err != nil {
				reply(w, nil, err)
				return
			}
			t.plan.log.Info("node killed", "node", nodeName(i))
			reply(w, t.NodeStatuses()[i], nil)
		case "restart":
			st, err := t.RestartNode(r.Context(), i)
			reply(w, st, err)
		default:
			reply(w, nil, fmt.Errorf("%w: action %q: want kill or restart", ErrInvalidConfig, r.PathValue("action")))
		}
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	go func() { _ = srv.Serve(ln) }()
	return nil
}

// parseNode reads a node's name as the testnet writes it ("n2") or its
// number ("2") into its index.
func parseNode(s string) (int, error) {
	n, err := strconv.Atoi(strings.TrimPrefix(s, "n"))
	if err != nil || n < 1 {
		return 0, fmt.Errorf("%w: node %q: want n1, n2, ... (or 1, 2, ...)", ErrInvalidConfig, s)
	}
	return n - 1, nil
}

// Control sends a control command to the testnet running in dir: action
// "kill" or "restart" on node ("n2" or "2"), or "" to list the nodes.
func Control(ctx context.Context, dir, action, node string) ([]NodeStatus, error) {
	sock := ControlSocket(dir)
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	method, path := http.MethodGet, "/nodes"
	if action != "" {
		if _, err := parseNode(node); err != nil {
			return nil, err
		}
		method, path = http.MethodPost, "/nodes/"+node+"/"+action
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://testnet"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		if pid := LockHolder(dir); pid > 0 {
			return nil, fmt.Errorf("%w in %s (its control socket does not answer: %v; process %d last held it)", ErrNoTestnet, dir, err, pid)
		}
		return nil, fmt.Errorf("%w in %s: %v", ErrNoTestnet, dir, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		_ = json.Unmarshal(b, &e)
		return nil, fmt.Errorf("testnet in %s: %s", dir, e.Error)
	}
	if action == "" {
		var out []NodeStatus
		return out, json.Unmarshal(b, &out)
	}
	var st NodeStatus
	return []NodeStatus{st}, json.Unmarshal(b, &st)
}
