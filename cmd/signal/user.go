package main

// The user's commands: signal runs create|list|show|metrics|delete, signal
// checkpoints list|download, signal account, signal models, signal nodes.
// Each connects as conn.go says: flags, then a testnet file, then the
// environment.

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

func init() {
	register(newUserRunsCmd)
	register(newUserCheckpointsCmd)
	register(newUserAccountCmd)
	register(newUserModelsCmd)
	register(newUserNodesCmd)
}

func newUserRunsCmd() *cobra.Command {
	runs := &cobra.Command{
		Use:   "runs",
		Short: "Create, list, show, inspect and end your training runs",
	}
	list := listCmd("list", "List your runs, newest first", "runs", noArgs, func(ctx context.Context, c *client.Client, o *conn, out io.Writer, _ []string) error {
		rs, err := c.ListRuns(ctx)
		if err != nil {
			return err
		}
		rs, more := newest(rs, o.limit, func(r protocol.Run) string { return r.CreatedAt })
		if o.json {
			return printJSON(out, protocol.RunList{Runs: rs})
		}
		return printRunsTable(out, rs, more)
	})
	runs.AddCommand(
		newRunsCreateCmd(),
		list,
		userCmd("show RUN_ID", "Show a run: status, node, step, last metrics, checkpoints, spent", exactArgs(1), func(ctx context.Context, c *client.Client, o *conn, out io.Writer, args []string) error {
			r, err := c.GetRun(ctx, args[0])
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, r.Info())
			}
			return printRun(out, r.Info())
		}),
		listCmd("metrics RUN_ID", "Print a run's loss, grad norm and learning rate per step (the last --limit steps)", "steps", exactArgs(1), func(ctx context.Context, c *client.Client, o *conn, out io.Writer, args []string) error {
			ms, err := c.RunMetrics(ctx, args[0])
			if err != nil {
				return err
			}
			more := 0
			if o.limit > 0 && len(ms) > o.limit {
				more, ms = len(ms)-o.limit, ms[len(ms)-o.limit:]
			}
			if o.json {
				return printJSON(out, protocol.MetricsResponse{Metrics: ms})
			}
			return printMetricsTable(out, ms, more)
		}),
		userCmd("delete RUN_ID", "End a run and free its node's session", exactArgs(1), func(ctx context.Context, c *client.Client, o *conn, out io.Writer, args []string) error {
			r, err := c.DeleteRun(ctx, args[0])
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, r)
			}
			_, err = fmt.Fprintf(out, "run %s %s at step %d, spent %s credits\n", r.ID, r.Status, r.Step, credits(r.SpentMicroCredits))
			return err
		}),
	)
	return runs
}

func newRunsCreateCmd() *cobra.Command {
	var req protocol.CreateRunRequest
	var rank, every int
	var alpha float64
	var seed int64
	cmd := userCmd("create", "Create a training run on a base model (GET /v1/models lists them)", noArgs, func(ctx context.Context, c *client.Client, o *conn, out io.Writer, _ []string) error {
		if req.BaseModel == "" {
			return usageErrorf("--model is required: one of the models `signal models` lists")
		}
		r, err := c.CreateRun(ctx, req)
		if err != nil {
			return err
		}
		if o.json {
			return printJSON(out, r.Info())
		}
		return printRun(out, r.Info())
	})
	f := cmd.Flags()
	f.StringVar(&req.BaseModel, "model", "", "base model (required)")
	f.IntVar(&rank, "lora-rank", 32, "LoRA rank")
	f.Float64Var(&alpha, "lora-alpha", 32, "LoRA alpha")
	f.StringSliceVar(&req.TargetModules, "target-modules", nil, "modules the adapter trains (default: every linear one)")
	f.IntVar(&every, "checkpoint-every", 10, "save a full checkpoint every this many steps (0: never)")
	f.Int64Var(&seed, "seed", 0, "the adapter's initialization seed (default: random)")
	f.StringVar(&req.Name, "name", "", "a label for the run")
	cmd.PreRunE = func(cmd *cobra.Command, _ []string) error {
		// Only what the user set is sent: the server's defaults stay the server's.
		if f.Changed("lora-rank") {
			req.LoRARank = &rank
		}
		if f.Changed("lora-alpha") {
			req.LoRAAlpha = &alpha
		}
		if f.Changed("checkpoint-every") {
			req.CheckpointEvery = &every
		}
		if f.Changed("seed") {
			req.Seed = &seed
		}
		return nil
	}
	return cmd
}

func newUserCheckpointsCmd() *cobra.Command {
	cps := &cobra.Command{Use: "checkpoints", Short: "List, download and push (to the Hugging Face Hub) your runs' checkpoints"}
	list := listCmd("list [RUN_ID]", "List the checkpoints of a run, or of all your runs, newest first", "checkpoints", maxArgs(1), func(ctx context.Context, c *client.Client, o *conn, out io.Writer, args []string) error {
		runID := ""
		if len(args) == 1 {
			runID = args[0]
		}
		all, err := c.ListCheckpoints(ctx, runID)
		if err != nil {
			return err
		}
		all, more := newest(all, o.limit, func(cp protocol.Checkpoint) string { return cp.CreatedAt })
		if o.json {
			return printJSON(out, map[string]any{"checkpoints": all})
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "ID\tRUN\tSTEP\tMODE\tSIZE\tCREATED\tURI\n")
		for _, cp := range all {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\n", cp.ID, cp.RunID, cp.Step, cp.Mode, bytesHuman(checkpointSize(cp)), humanTime(cp.CreatedAt), cp.URI)
		}
		moreLine(tw, more, "checkpoints")
		return tw.Flush()
	})
	var outDir, storeURL string
	dl := userCmd("download CHECKPOINT_ID", "Download a checkpoint's files (verified by their CIDs) into --out", exactArgs(1), func(ctx context.Context, c *client.Client, o *conn, out io.Writer, args []string) error {
		all, err := c.ListCheckpoints(ctx, "")
		if err != nil {
			return err
		}
		i := slices.IndexFunc(all, func(cp protocol.Checkpoint) bool { return cp.ID == args[0] || cp.URI == args[0] })
		if i < 0 {
			return fmt.Errorf("checkpoint %q is not one of your runs' (signal checkpoints list shows them): %w", args[0], client.ErrNotFound)
		}
		cp := all[i]
		if outDir == "" {
			outDir = cp.ID
		}
		type file struct {
			Name, CID string
			Size      int64
		}
		var got []file
		if storeURL == "" && os.Getenv("SIGNAL_STORAGE") == "" {
			// Through the coordinator's signed URLs: no store credentials.
			fs, err := c.DownloadCheckpoint(ctx, cp.ID, outDir)
			if err != nil {
				return fmt.Errorf("download checkpoint %s: %w", cp.ID, err)
			}
			for _, f := range fs {
				got = append(got, file{f.Name, f.CID, f.Size})
			}
		} else {
			st, err := checkpointStore(o, storeURL, cp)
			if err != nil {
				return err
			}
			if err := os.MkdirAll(outDir, 0o755); err != nil {
				return err
			}
			m, err := storage.Resolver{Default: st}.Fetch(ctx, cp.URI, outDir)
			if err != nil {
				return fmt.Errorf("download checkpoint %s: %w", cp.ID, err)
			}
			for _, f := range m.Files {
				got = append(got, file{f.Name, f.CID, f.Size})
			}
		}
		if o.json {
			return printJSON(out, map[string]any{"checkpoint": cp, "dir": outDir})
		}
		fmt.Fprintf(out, "checkpoint %s (run %s, step %d, %s) in %s:\n", cp.ID, cp.RunID, cp.Step, cp.Mode, outDir)
		for _, f := range got {
			fmt.Fprintf(out, "  %-28s %10s  cid %s\n", f.Name, bytesHuman(f.Size), f.CID)
		}
		return nil
	})
	dl.Flags().StringVarP(&outDir, "out", "o", "", "directory to write the files into (default: the checkpoint's id)")
	dl.Flags().StringVar(&storeURL, "storage", "", "read the network's checkpoint store directly, as nodes are given it: file:///dir or s3://bucket/prefix?endpoint=host:port (or $SIGNAL_STORAGE, with $AWS_*); default: through the coordinator, no credentials needed")
	cps.AddCommand(list, dl, newCheckpointsPushCmd())
	return cps
}

// checkpointStore opens the store a checkpoint is read from directly:
// --storage, $SIGNAL_STORAGE (the testnet's when neither names one), or,
// for a file:// URI, its directory.
func checkpointStore(o *conn, flag string, cp protocol.Checkpoint) (storage.Store, error) {
	u := flag
	if u == "" {
		if tn := firstSet(o.testnet, os.Getenv("SIGNAL_TESTNET")); tn != "" {
			if tf, err := client.ReadTestnetFile(tn); err == nil {
				u = tf.StorageURL
			}
		}
	}
	if u == "" {
		u = os.Getenv("SIGNAL_STORAGE")
	}
	if u == "" && strings.HasPrefix(cp.URI, "file://") {
		u = cp.URI[:strings.LastIndex(cp.URI, "/")]
	}
	if u == "" {
		return nil, usageErrorf("checkpoint %s is at %s: pass --storage (s3://bucket/prefix?endpoint=host:port) or set SIGNAL_STORAGE, with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", cp.ID, cp.URI)
	}
	st, err := storage.Open(u, storage.Credentials{})
	if err != nil {
		return nil, usageErrorf("--storage %q: %v", u, err)
	}
	return st, nil
}

func checkpointSize(cp protocol.Checkpoint) int64 {
	var n int64
	for _, f := range cp.Files {
		n += f.Size
	}
	return n
}

func newUserAccountCmd() *cobra.Command {
	return listCmd("account", "Show your balance, spending and recent charges", "charges", noArgs, func(ctx context.Context, c *client.Client, o *conn, out io.Writer, _ []string) error {
		a, err := c.Account(ctx)
		if err != nil {
			return err
		}
		charges, more := newest(a.Charges, o.limit, func(ch protocol.Charge) string { return ch.Time })
		if o.json {
			a.Charges = charges
			return printJSON(out, a)
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "account\t%s\nbalance\t%s credits\nspent\t%s credits\n", a.Account, credits(a.BalanceMicroCredits), credits(a.SpentMicroCredits))
		if len(charges) > 0 {
			fmt.Fprintf(tw, "\nTIME\tRUN\tCALL\tCREDITS\n")
			for _, ch := range charges {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", humanTime(ch.Time), dash(ch.RunID), ch.Call, credits(ch.MicroCredits))
			}
			moreLine(tw, more, "charges")
		}
		return tw.Flush()
	})
}

func newUserModelsCmd() *cobra.Command {
	return userCmd("models", "List the base models the network serves, with prices", noArgs, func(ctx context.Context, c *client.Client, o *conn, out io.Writer, _ []string) error {
		ms, err := c.Models(ctx)
		if err != nil {
			return err
		}
		if o.json {
			return printJSON(out, protocol.ModelList{Models: ms})
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "NAME\tCONTEXT\tMEMORY\tTRAIN/1K\tPREFILL/1K\tSAMPLE/1K\tSTORAGE/GB-H\n")
		for _, m := range ms {
			p := m.Prices
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\n", m.Name, m.ContextLength, bytesHuman(m.MemoryBytes),
				credits(p.TrainMicroCreditsPer1K), credits(p.PrefillMicroCreditsPer1K), credits(p.SampleMicroCreditsPer1K), credits(p.StorageMicroCreditsPerGBHour))
		}
		fmt.Fprintf(tw, "(prices in credits per 1,000 tokens, and per GB-hour of stored checkpoints)\n")
		return tw.Flush()
	})
}

func newUserNodesCmd() *cobra.Command {
	return userCmd("nodes", "List the live nodes and their capacity", noArgs, func(ctx context.Context, c *client.Client, o *conn, out io.Writer, _ []string) error {
		ns, err := c.Nodes(ctx)
		if err != nil {
			return err
		}
		if o.json {
			return printJSON(out, protocol.NodeList{Nodes: ns})
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "PEER\tCAPACITY\tBACKENDS\tMODELS\tSESSIONS\tLAST SEEN\n")
		for _, n := range ns {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%s\n", n.PeerID, nodeCapacity(n), dash(strings.Join(n.Backends, ",")),
				dash(strings.Join(n.Models, ",")), n.Sessions, n.MaxSessions, humanTime(n.LastSeen))
		}
		return tw.Flush()
	})
}

func printJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// newest sorts xs newest first by their RFC 3339 time and keeps limit of
// them (0: all); it returns how many it left out.
func newest[T any](xs []T, limit int, at func(T) string) ([]T, int) {
	xs = slices.Clone(xs)
	slices.SortStableFunc(xs, func(a, b T) int { return cmp.Compare(parseTime(at(b)), parseTime(at(a))) })
	if limit > 0 && len(xs) > limit {
		return xs[:limit], len(xs) - limit
	}
	return xs, 0
}

func parseTime(s string) int64 {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return 0
	}
	return t.UnixNano()
}

// moreLine tells a table's reader what --limit left out.
func moreLine(w io.Writer, more int, what string) {
	if more > 0 {
		fmt.Fprintf(w, "(%d older %s not shown: --limit 0 shows all)\n", more, what)
	}
}

func printRunsTable(out io.Writer, rs []protocol.Run, more int) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "ID\tNAME\tMODEL\tSTATUS\tSTEP\tLOSS\tSPENT\tNODE\tCREATED\n")
	for _, r := range rs {
		loss := "-"
		if r.LastMetrics != nil && r.LastMetrics.LossMean != nil {
			loss = fmt.Sprintf("%.4f", *r.LastMetrics.LossMean)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", r.ID, dash(r.Name), r.BaseModel, r.Status, r.Step, loss,
			credits(r.SpentMicroCredits), dash(shortPeer(r.Node)), humanTime(r.CreatedAt))
	}
	moreLine(tw, more, "runs")
	return tw.Flush()
}

func printRun(out io.Writer, r protocol.Run) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "id\t%s\n", r.ID)
	if r.Name != "" {
		fmt.Fprintf(tw, "name\t%s\n", r.Name)
	}
	fmt.Fprintf(tw, "base model\t%s\n", r.BaseModel)
	fmt.Fprintf(tw, "lora\trank %d, alpha %g, modules %s\n", r.LoRARank, r.LoRAAlpha, dash(strings.Join(r.TargetModules, ",")))
	fmt.Fprintf(tw, "status\t%s\n", r.Status)
	if r.StatusReason != "" {
		fmt.Fprintf(tw, "why\t%s\n", r.StatusReason)
	}
	fmt.Fprintf(tw, "node\t%s\n", dash(r.Node))
	fmt.Fprintf(tw, "step\t%d\n", r.Step)
	if r.ResumedFromStep != nil {
		fmt.Fprintf(tw, "resumed from step\t%d\n", *r.ResumedFromStep)
	}
	fmt.Fprintf(tw, "checkpoint every\t%d steps\n", r.CheckpointEvery)
	fmt.Fprintf(tw, "spent\t%s credits\n", credits(r.SpentMicroCredits))
	fmt.Fprintf(tw, "created\t%s (%s)\n", humanTime(r.CreatedAt), r.CreatedAt)
	if m := r.LastMetrics; m != nil {
		fmt.Fprintf(tw, "last metrics\tstep %d, loss %s, grad norm %s, lr %s, %s\n", m.Step, optFloat(m.LossMean), optFloat(m.GradNorm), optFloat(m.LearningRate), humanTime(m.Time))
	}
	for _, ck := range r.Checkpoints {
		fmt.Fprintf(tw, "checkpoint\t%s step %d %s %s (%s, %d files)\n", ck.ID, ck.Step, ck.Mode, ck.URI, bytesHuman(checkpointSize(ck)), len(ck.Files))
	}
	return tw.Flush()
}

func printMetricsTable(out io.Writer, ms []protocol.Metrics, more int) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	if more > 0 {
		fmt.Fprintf(tw, "(%d earlier steps not shown: --limit 0 shows all)\n", more)
	}
	fmt.Fprintf(tw, "STEP\tLOSS\tGRAD NORM\tLR\tTOKENS\tTIME\n")
	for _, m := range ms {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%s\n", m.Step, optFloat(m.LossMean), optFloat(m.GradNorm), optFloat(m.LearningRate), m.Tokens, humanTime(m.Time))
	}
	return tw.Flush()
}

// now is the clock humanTime reads; tests set it.
var now = time.Now

// humanTime writes an RFC 3339 time for a table: how long ago within a
// day ("45s ago", "12m ago", "3h ago"), else the local date and minute.
func humanTime(s string) string {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return dash(s)
	}
	d := now().Sub(t)
	switch {
	case d < -time.Minute:
		return t.Local().Format("2006-01-02 15:04")
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", max(int(d.Seconds()), 0))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%02dm ago", int(d.Hours()), int(d.Minutes())%60)
	}
	return t.Local().Format("2006-01-02 15:04")
}

// credits formats micro-credits as credits, exactly (no float rounding).
func credits(mc protocol.MicroCredits) string { return protocol.FormatCredits(mc) }

func optFloat(p *float64) string {
	if p == nil {
		return "-"
	}
	return fmt.Sprintf("%.4g", *p)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// shortPeer abbreviates a libp2p peer id for a table; show prints it whole.
func shortPeer(p string) string {
	if len(p) > 16 {
		return p[:6] + "…" + p[len(p)-6:]
	}
	return p
}

func bytesHuman(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func nodeCapacity(n protocol.Node) string {
	if len(n.GPUs) == 0 {
		return fmt.Sprintf("cpu %d cores, %s", n.CPU.Cores, bytesHuman(n.CPU.MemoryTotal))
	}
	parts := make([]string, 0, len(n.GPUs))
	for _, g := range n.GPUs {
		// Utilization is a fraction (0..1), as the node's NVML fingerprint reports it.
		parts = append(parts, fmt.Sprintf("%s, %s of %s free, %.0f%% busy", g.Name, bytesHuman(g.MemoryFree), bytesHuman(g.MemoryTotal), 100*g.Utilization))
	}
	return strings.Join(parts, "; ")
}
