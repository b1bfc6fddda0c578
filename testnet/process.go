package testnet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// MemberSpec is what a child process is told to run (as a JSON file, not
// arguments, so the admin and join tokens do not show in ps).
type MemberSpec struct {
	Name        string           `json:"name"`
	Coordinator *CoordinatorSpec `json:"coordinator,omitempty"`
	Node        *NodeSpec        `json:"node,omitempty"`
	// ReadyFile is where the member writes its addresses once it listens.
	ReadyFile string `json:"ready_file"`
}

// memberReady is a child's ready file.
type memberReady struct {
	URL      string   `json:"url,omitempty"`
	P2PAddrs []string `json:"p2p_addrs,omitempty"`
	PeerID   string   `json:"peer_id,omitempty"`
	PID      int      `json:"pid"`
}

// RunMember is a child process's body (`signal testnet member --spec
// FILE`): it starts the member the spec names, writes its ready file, and
// runs until ctx ends (SIGTERM or SIGINT), then stops it gracefully.
func RunMember(ctx context.Context, specFile string, log *slog.Logger) error {
	raw, err := os.ReadFile(specFile)
	if err != nil {
		return fmt.Errorf("member spec: %w", err)
	}
	var spec MemberSpec
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		return fmt.Errorf("member spec %s: %w", specFile, err)
	}
	if (spec.Coordinator == nil) == (spec.Node == nil) || spec.ReadyFile == "" {
		return fmt.Errorf("member spec %s: %w: want exactly one of coordinator and node, and ready_file", specFile, ErrInvalidConfig)
	}
	ready := memberReady{PID: os.Getpid()}
	var stop func() error
	if c := spec.Coordinator; c != nil {
		m, err := StartCoordinator(ctx, *c, log)
		if err != nil {
			return err
		}
		ready.URL, ready.P2PAddrs, stop = m.URL(), m.P2PAddrs(), m.Stop
	} else {
		n, err := StartNode(ctx, *spec.Node, log)
		if err != nil {
			return err
		}
		ready.PeerID, stop = n.PeerID(), n.Stop
	}
	b, _ := json.Marshal(ready)
	tmp := spec.ReadyFile + ".tmp"
	// One err for both steps: a failed write must not pass as a ready file.
	err = os.WriteFile(tmp, b, 0o600)
	if err == nil {
		err = os.Rename(tmp, spec.ReadyFile)
	}
	if err != nil {
		_ = stop()
		return fmt.Errorf("ready file: %w", err)
	}
	log.Info("member ready", "name", spec.Name, "url", ready.URL, "peer", ready.PeerID)
	<-ctx.Done()
	log.Info("member stopping", "name", spec.Name)
	return stop()
}

// member is one child process.
type member struct {
	name string
	// pid is the process's id, read once it started.
	pid  int
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{} // closed when the process has exited
	err  error         // its exit status, once done
	// stopping is set when the testnet asked it to end, so its exit is
	// not reported as a failure.
	stopping bool
}

// Processes is a testnet whose members are child processes of binary.
type Processes struct {
	info   *Info
	plan   *plan
	binary string

	mu     sync.Mutex
	coords []*member
	// nodes[j] is node n(j+1)'s latest process; nodeSpecs[j] what it runs.
	nodes     []*member
	nodeSpecs []NodeSpec
	stopped   bool
	// exited receives members that ended without being asked to.
	exited chan string
}

// StartProcesses starts a testnet of child processes running binary (the
// signal binary: `binary testnet member --spec FILE`) and returns once
// every coordinator lists every node. Members log to Dir/logs/NAME.log.
// The children are in their own process group, so a Ctrl-C in the
// terminal reaches only the parent, which stops them in order; on Linux
// they are also killed if the parent dies.
func StartProcesses(ctx context.Context, cfg Config, binary string) (*Processes, error) {
	p, err := prepare(cfg)
	if err != nil {
		return nil, err
	}
	t := &Processes{plan: p, binary: binary, exited: make(chan string, 32)}
	info, err := bringUp(ctx, p, t)
	if err != nil {
		_ = t.Stop()
		return nil, err
	}
	t.mu.Lock()
	for _, m := range append(append([]*member(nil), t.coords...), t.nodes...) {
		info.PIDs = append(info.PIDs, m.pid)
	}
	t.info = info
	t.mu.Unlock()
	if err := WriteInfo(p.dir, info); err != nil {
		_ = t.Stop()
		return nil, err
	}
	return t, nil
}

func (t *Processes) coordinator(ctx context.Context, i int, spec CoordinatorSpec) (string, []string, error) {
	r, err := t.spawn(ctx, spec.ID, MemberSpec{Coordinator: &spec}, func(m *member) { t.coords = append(t.coords, m) })
	if err != nil {
		return "", nil, err
	}
	return r.URL, r.P2PAddrs, nil
}

func (t *Processes) node(ctx context.Context, j int, spec NodeSpec) (string, error) {
	t.mu.Lock()
	t.nodeSpecs = append(t.nodeSpecs, spec)
	t.mu.Unlock()
	r, err := t.spawn(ctx, nodeName(j), MemberSpec{Node: &spec}, func(m *member) { t.nodes = append(t.nodes, m) })
	if err != nil {
		return "", err
	}
	return r.PeerID, nil
}

func nodeName(j int) string { return fmt.Sprintf("n%d", j+1) }

// spawn starts one child, has place record it (under t.mu), and waits for
// its ready file.
func (t *Processes) spawn(ctx context.Context, name string, spec MemberSpec, place func(*member)) (memberReady, error) {
	var ready memberReady
	runDir := filepath.Join(t.plan.dir, "run")
	spec.Name = name
	spec.ReadyFile = filepath.Join(runDir, name+".ready")
	specFile := filepath.Join(runDir, name+".json")
	// A ready file left by an earlier start would name dead addresses.
	if err := os.Remove(spec.ReadyFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return ready, fmt.Errorf("member ready file: %w", err)
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return ready, err
	}
	if err := os.WriteFile(specFile, b, 0o600); err != nil {
		return ready, fmt.Errorf("member spec: %w", err)
	}
	logPath := filepath.Join(t.plan.dir, "logs", name+".log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return ready, fmt.Errorf("member log: %w", err)
	}
	cmd := exec.Command(t.binary, "testnet", "member", "--spec", specFile)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = childAttrs()
	if err := cmd.Start(); err != nil {
		lf.Close()
		return ready, fmt.Errorf("start %s: %w", name, err)
	}
	m := &member{name: name, pid: cmd.Process.Pid, cmd: cmd, log: lf, done: make(chan struct{})}
	go func() {
		m.err = cmd.Wait()
		lf.Close()
		t.mu.Lock()
		stopping := m.stopping
		t.mu.Unlock()
		close(m.done)
		if !stopping {
			select {
			case t.exited <- name:
			default:
			}
		}
	}()
	t.mu.Lock()
	if t.stopped {
		t.mu.Unlock()
		_ = cmd.Process.Kill()
		<-m.done
		return ready, errStopped
	}
	place(m)
	t.mu.Unlock()

	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if b, err := os.ReadFile(spec.ReadyFile); err == nil {
			if err := json.Unmarshal(b, &ready); err != nil {
				return ready, fmt.Errorf("%s ready file: %w", name, err)
			}
			return ready, nil
		}
		select {
		case <-m.done:
			return ready, fmt.Errorf("%w: %s (%v); its log %s ends:\n%s", ErrMemberExited, name, m.err, logPath, tail(logPath, 15))
		case <-ctx.Done():
			return ready, fmt.Errorf("%w: %s did not become ready: %w; its log %s ends:\n%s", ErrNotReady, name, ctx.Err(), logPath, tail(logPath, 15))
		case <-tick.C:
		}
	}
}

// tail returns the last n lines of a file, for error messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Info is what testnet.json holds.
func (t *Processes) Info() Info {
	t.mu.Lock()
	defer t.mu.Unlock()
	info := *t.info
	info.PIDs = append([]int(nil), info.PIDs...)
	return info
}

// Exited receives the name of a member that ended without being asked to.
func (t *Processes) Exited() <-chan string { return t.exited }

// KillNode kills node i's process (SIGKILL: no drain, no checkpoint), and
// the processes it started (a PyTorch worker), as a machine that dies
// takes them all.
func (t *Processes) KillNode(i int) error {
	m, err := t.nodeMember(i)
	if err != nil {
		return err
	}
	t.mu.Lock()
	m.stopping = true
	t.mu.Unlock()
	killTree(m.pid)
	<-m.done
	return nil
}

func (t *Processes) nodeMember(i int) (*member, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		return nil, errStopped
	}
	if i < 0 || i >= len(t.nodes) {
		return nil, fmt.Errorf("%w: node %d: the testnet has n1..n%d", ErrInvalidConfig, i+1, len(t.nodes))
	}
	return t.nodes[i], nil
}

// NodeStatus is one node member as the testnet sees it.
type NodeStatus struct {
	Name   string `json:"name"`
	PID    int    `json:"pid"`
	PeerID string `json:"peer_id"`
	// Running is false once the process has exited (killed, or crashed).
	Running bool `json:"running"`
}

// NodeStatuses lists the node members, n1 first.
func (t *Processes) NodeStatuses() []NodeStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]NodeStatus, len(t.nodes))
	for j, m := range t.nodes {
		out[j] = NodeStatus{Name: m.name, PID: m.pid, Running: !m.exited()}
		if t.info != nil && j < len(t.info.Nodes) {
			out[j].PeerID = t.info.Nodes[j]
		}
	}
	return out
}

// RestartNode starts node i again with its data directory (so its peer id,
// and the coordinators' record of it, are the same), stopping it first if
// it still runs, and returns once every coordinator lists it again.
func (t *Processes) RestartNode(ctx context.Context, i int) (NodeStatus, error) {
	old, err := t.nodeMember(i)
	if err != nil {
		return NodeStatus{}, err
	}
	if !old.exited() {
		t.mu.Lock()
		old.stopping = true
		t.mu.Unlock()
		if errs := stopAll([]*member{old}, 20*time.Second); len(errs) > 0 {
			t.plan.log.Warn("node did not stop in time", "node", old.name, "err", errors.Join(errs...))
		}
	}
	t.mu.Lock()
	spec := t.nodeSpecs[i]
	t.mu.Unlock()
	r, err := t.spawn(ctx, nodeName(i), MemberSpec{Node: &spec}, func(m *member) { t.nodes[i] = m })
	if err != nil {
		return NodeStatus{}, err
	}
	if err := waitNodes(ctx, t.info.Coordinators, t.info.APIKey, []string{r.PeerID}); err != nil {
		return NodeStatus{}, err
	}
	t.mu.Lock()
	if k := len(t.coords) + i; k < len(t.info.PIDs) {
		t.info.PIDs[k] = r.PID
	}
	info := *t.info
	t.mu.Unlock()
	if err := WriteInfo(t.plan.dir, &info); err != nil {
		return NodeStatus{}, err
	}
	t.plan.log.Info("node restarted", "node", nodeName(i), "pid", r.PID, "peer", r.PeerID)
	return NodeStatus{Name: nodeName(i), PID: r.PID, PeerID: r.PeerID, Running: true}, nil
}

func (m *member) exited() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

// Stop ends the members, nodes first (so they can checkpoint open runs
// while the coordinators still run), each with SIGTERM and, after a grace
// period, SIGKILL; it returns once every child has exited.
func (t *Processes) Stop() error {
	t.mu.Lock()
	if t.stopped {
		t.mu.Unlock()
		return nil
	}
	t.stopped = true
	nodes, coords := t.nodes, t.coords
	for _, m := range append(append([]*member(nil), nodes...), coords...) {
		m.stopping = true
	}
	t.mu.Unlock()
	errs := stopAll(nodes, 20*time.Second)
	errs = append(errs, stopAll(coords, 10*time.Second)...)
	t.plan.lock.release()
	return errors.Join(errs...)
}

func stopAll(ms []*member, grace time.Duration) []error {
	var errs []error
	for _, m := range ms {
		select {
		case <-m.done:
			continue
		default:
		}
		_ = m.cmd.Process.Signal(syscall.SIGTERM)
	}
	deadline := time.After(grace)
	for _, m := range ms {
		select {
		case <-m.done:
		case <-deadline:
			_ = m.cmd.Process.Kill()
			<-m.done
			errs = append(errs, fmt.Errorf("%s did not stop within %v: killed", m.name, grace))
			deadline = time.After(0)
		}
	}
	return errs
}

// WriteLogTail copies the end of every member log to w (for failures).
func (t *Processes) WriteLogTail(w io.Writer, lines int) {
	ents, _ := os.ReadDir(filepath.Join(t.plan.dir, "logs"))
	for _, e := range ents {
		p := filepath.Join(t.plan.dir, "logs", e.Name())
		fmt.Fprintf(w, "==> %s <==\n%s\n", p, tail(p, lines))
	}
}
