package testnet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/signal-p2p/signal/coordinator"
	"github.com/signal-p2p/signal/internal/retry"
	"github.com/signal-p2p/signal/protocol"
)

// launcher starts members; the in-process and multi-process variants
// differ only here.
type launcher interface {
	// coordinator starts member i and returns its public URL and the
	// multiaddrs nodes bootstrap to, once it listens.
	coordinator(ctx context.Context, i int, spec CoordinatorSpec) (url string, p2pAddrs []string, err error)
	// node starts node j and returns its peer ID once it listens.
	node(ctx context.Context, j int, spec NodeSpec) (peerID string, err error)
}

// plan is what both variants compute before starting anything.
type plan struct {
	// lock holds dir for the testnet's life; stopping releases it.
	lock       *dirLock
	cfg        Config
	dir        string
	adminToken string
	models     []coordinator.ModelSpec
	modelDirs  map[string]string
	storageURL string
	log        *slog.Logger
}

// prepare validates cfg, makes the directory layout (a fresh network each
// time: old coordinator and node state is removed, the generated model
// and checkpoints are kept) and generates the default model.
func prepare(cfg Config) (*plan, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("testnet dir %s: %w", cfg.Dir, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	// Before anything under dir is touched: clearing it under a running
	// testnet would pull its data out from under it.
	lock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	p, err := prepareLocked(cfg, dir, log)
	if err != nil {
		lock.release()
		return nil, err
	}
	p.lock = lock
	return p, nil
}

// prepareLocked is prepare with dir held.
func prepareLocked(cfg Config, dir string, log *slog.Logger) (*plan, error) {
	for _, sub := range []string{"coordinators", "nodes", "logs", "run"} {
		if err := os.RemoveAll(filepath.Join(dir, sub)); err != nil {
			return nil, fmt.Errorf("testnet dir: clear %s: %w", sub, err)
		}
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("testnet dir: %w", err)
		}
	}
	_ = os.Remove(filepath.Join(dir, "testnet.json"))
	p := &plan{cfg: cfg, dir: dir, log: log, modelDirs: map[string]string{}}
	if !cfg.NoDefaultModel {
		md := filepath.Join(dir, "models", DefaultModelName)
		if _, err := os.Stat(filepath.Join(md, modelMarker)); err != nil {
			log.Info("generating the default model (once)", "model", DefaultModelName, "dir", md)
		}
		if err := EnsureDefaultModel(md); err != nil {
			return nil, err
		}
		p.modelDirs[DefaultModelName] = md
	}
	for name, d := range cfg.Models {
		abs, err := filepath.Abs(d)
		if err != nil {
			return nil, fmt.Errorf("model %s: %w", name, err)
		}
		p.modelDirs[name] = abs
	}
	names := make([]string, 0, len(p.modelDirs))
	for n := range p.modelDirs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		m, err := coordinator.ModelFromDir(n, p.modelDirs[n])
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
		}
		if n == DefaultModelName {
			m.Aliases = []string{DefaultModelAlias}
		}
		p.models = append(p.models, m)
	}
	p.storageURL = cfg.StorageURL
	if p.storageURL == "" {
		p.storageURL = "file://" + filepath.Join(dir, "checkpoints")
	}
	p.adminToken = "adm-" + randomHex(16)
	return p, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// bringUp starts the coordinators, forms the raft cluster, mints the keys,
// starts the nodes and waits until every coordinator lists every node.
func bringUp(ctx context.Context, p *plan, l launcher) (*Info, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.ReadyTimeout)
	defer cancel()
	info := &Info{AdminToken: p.adminToken, StorageURL: p.storageURL, Dir: p.dir, Logs: filepath.Join(p.dir, "logs")}
	for _, m := range p.models {
		info.Models = append(info.Models, m.Name)
	}
	var p2pAddrs []string
	for i := 0; i < p.cfg.Coordinators; i++ {
		spec := CoordinatorSpec{
			ID:                fmt.Sprintf("c%d", i+1),
			DataDir:           filepath.Join(p.dir, "coordinators", fmt.Sprintf("c%d", i+1)),
			Bootstrap:         i == 0,
			AdminToken:        p.adminToken,
			Models:            p.models,
			NodeLostAfter:     p.cfg.NodeLostAfter,
			NodeTTL:           p.cfg.NodeTTL,
			RatePerSecond:     p.cfg.RatePerSecond,
			TinkerChunkLen:    p.cfg.TinkerChunkLen,
			ChallengeInterval: p.cfg.ChallengeInterval,
			RateBurst:         p.cfg.RateBurst,
			StorageURL:        p.storageURL,
			Creds:             p.cfg.Creds,
		}
		if i > 0 {
			spec.Join = info.Coordinators[0]
		}
		u, addrs, err := l.coordinator(ctx, i, spec)
		if err != nil {
			return info, fmt.Errorf("start coordinator %s: %w", spec.ID, err)
		}
		p.log.Info("coordinator started", "id", spec.ID, "url", u)
		info.Coordinators = append(info.Coordinators, u)
		p2pAddrs = append(p2pAddrs, addrs...)
	}
	info.Dashboard = info.Coordinators[0] + "/dashboard"
	adm := &admin{urls: info.Coordinators, token: p.adminToken}
	if err := adm.waitCluster(ctx, p.cfg.Coordinators); err != nil {
		return info, err
	}
	p.log.Info("raft cluster formed", "members", p.cfg.Coordinators)

	var key protocol.CreateKeyResponse
	if err := adm.post(ctx, "/v1/admin/keys", protocol.CreateKeyRequest{MicroCredits: p.cfg.MicroCredits, Name: "testnet"}, &key); err != nil {
		return info, fmt.Errorf("mint API key: %w", err)
	}
	info.APIKey, info.Account = key.APIKey, key.Account
	var jt protocol.JoinTokenResponse
	if err := adm.post(ctx, "/v1/admin/join_tokens", protocol.JoinTokenRequest{OperatorAccount: "testnet-operator"}, &jt); err != nil {
		return info, fmt.Errorf("mint join token: %w", err)
	}

	for j := 0; j < p.cfg.Nodes; j++ {
		spec := NodeSpec{
			DataDir:        filepath.Join(p.dir, "nodes", fmt.Sprintf("n%d", j+1)),
			Bootstrap:      p2pAddrs,
			JoinToken:      jt.JoinToken,
			StorageURL:     p.storageURL,
			Creds:          p.cfg.Creds,
			Models:         p.modelDirs,
			MaxSessions:    p.cfg.MaxSessions,
			Engine:         p.cfg.Engine,
			AdvertInterval: p.cfg.AdvertInterval,
		}
		id, err := l.node(ctx, j, spec)
		if err != nil {
			return info, fmt.Errorf("start node n%d: %w", j+1, err)
		}
		p.log.Info("node started", "node", fmt.Sprintf("n%d", j+1), "peer", id)
		info.Nodes = append(info.Nodes, id)
	}
	if err := waitNodes(ctx, info.Coordinators, info.APIKey, info.Nodes); err != nil {
		return info, err
	}
	p.log.Info("nodes advertising", "nodes", len(info.Nodes))
	return info, nil
}

// WriteInfo writes testnet.json (mode 0600: it holds the admin token).
func WriteInfo(dir string, info *Info) error {
	b, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, ".testnet.json.tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("write testnet.json: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "testnet.json")); err != nil {
		return fmt.Errorf("write testnet.json: %w", err)
	}
	return nil
}

// admin makes the testnet's admin calls, retrying while the cluster is
// still electing (503) or a member is still binding (connection refused).
type admin struct {
	urls  []string
	token string
	http  http.Client
}

func (a *admin) do(ctx context.Context, base, method, path, token string, in, out any) (int, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, base+path, body)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return resp.StatusCode, err
	}
	if resp.StatusCode/100 != 2 {
		var e protocol.ErrorResponse
		_ = json.Unmarshal(raw, &e)
		return resp.StatusCode, fmt.Errorf("%s %s: status %d: %s", method, path, resp.StatusCode, e.Error.Message)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return resp.StatusCode, fmt.Errorf("%s %s: decode: %w", method, path, err)
		}
	}
	return resp.StatusCode, nil
}

// post sends an admin write to the first coordinator (it forwards to the
// leader), retrying transient failures until ctx ends.
func (a *admin) post(ctx context.Context, path string, in, out any) error {
	err := retry.Do(ctx, func() error {
		status, err := a.do(ctx, a.urls[0], http.MethodPost, path, a.token, in, out)
		if err != nil && status != 0 && status != http.StatusServiceUnavailable && status != http.StatusConflict {
			return retry.Permanent(err)
		}
		return err
	}, nil)
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	return err
}

// waitCluster waits until every member reports the same leader and all n
// members are in the replicated member table.
func (a *admin) waitCluster(ctx context.Context, n int) error {
	err := retry.Do(ctx, func() error {
		leader := ""
		for _, u := range a.urls {
			var st coordinator.ClusterStatus
			if _, err := a.do(ctx, u, http.MethodGet, "/v1/cluster", a.token, nil, &st); err != nil {
				return err
			}
			if st.LeaderID == "" || len(st.Members) != n || (leader != "" && st.LeaderID != leader) {
				return fmt.Errorf("member %s: leader %q, %d of %d members known", st.ID, st.LeaderID, len(st.Members), n)
			}
			leader = st.LeaderID
		}
		return nil
	}, nil)
	if err != nil {
		return fmt.Errorf("%w: raft cluster did not form: %w", ErrNotReady, err)
	}
	return nil
}

// waitNodes waits until every coordinator lists every node in /v1/nodes.
func waitNodes(ctx context.Context, urls []string, key string, want []string) error {
	a := &admin{}
	err := retry.Do(ctx, func() error {
		for _, u := range urls {
			var l protocol.NodeList
			if _, err := a.do(ctx, u, http.MethodGet, "/v1/nodes", key, nil, &l); err != nil {
				return err
			}
			have := map[string]bool{}
			for _, n := range l.Nodes {
				have[n.PeerID] = true
			}
			var missing []string
			for _, id := range want {
				if !have[id] {
					missing = append(missing, id)
				}
			}
			if len(missing) > 0 {
				return fmt.Errorf("%s lists %d of %d nodes (missing %s)", u, len(want)-len(missing), len(want), strings.Join(missing, ", "))
			}
		}
		return nil
	}, nil)
	if err != nil {
		return fmt.Errorf("%w: nodes did not appear in /v1/nodes: %w", ErrNotReady, err)
	}
	return nil
}

// errStopped is returned by a launcher used after Stop.
var errStopped = errors.New("testnet stopped")
