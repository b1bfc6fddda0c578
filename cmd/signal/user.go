package main

// The user's commands: signal runs list|show|metrics|delete, signal account,
// signal models, signal nodes. Each reads SIGNAL_URL and SIGNAL_API_KEY (or
// a testnet.json); flags override.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

func init() {
	register(newUserRunsCmd)
	register(newUserAccountCmd)
	register(newUserModelsCmd)
	register(newUserNodesCmd)
}

// userConn holds the connection flags every user command shares.
type userConn struct {
	url, apiKey, testnet string
	json                 bool
	timeout              time.Duration
}

func (o *userConn) bind(fs *pflag.FlagSet) {
	fs.StringVar(&o.url, "url", "", "coordinator URL (default $SIGNAL_URL)")
	fs.StringVar(&o.apiKey, "api-key", "", "API key (default $SIGNAL_API_KEY)")
	fs.StringVar(&o.testnet, "testnet", "", "read the URL and API key from this testnet.json")
	fs.BoolVar(&o.json, "json", false, "print the API's JSON instead of a table")
	fs.DurationVar(&o.timeout, "timeout", time.Minute, "give up after this long")
}

// client resolves flags over testnet file over environment, and connects.
func (o *userConn) client(ctx context.Context) (*client.Client, context.Context, context.CancelFunc, error) {
	url, key := os.Getenv("SIGNAL_URL"), os.Getenv("SIGNAL_API_KEY")
	if o.testnet != "" {
		tf, err := client.ReadTestnetFile(o.testnet)
		if err != nil {
			return nil, nil, nil, err
		}
		url, key = tf.Coordinators[0], tf.APIKey
	}
	if o.url != "" {
		url = o.url
	}
	if o.apiKey != "" {
		key = o.apiKey
	}
	if url == "" {
		return nil, nil, nil, fmt.Errorf("no coordinator URL: set SIGNAL_URL or pass --url or --testnet")
	}
	if key == "" {
		return nil, nil, nil, fmt.Errorf("no API key: set SIGNAL_API_KEY or pass --api-key or --testnet")
	}
	c, err := client.New(url, key)
	if err != nil {
		return nil, nil, nil, err
	}
	if o.timeout <= 0 {
		return nil, nil, nil, fmt.Errorf("--timeout %v: want > 0", o.timeout)
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	return c, ctx, cancel, nil
}

// userCmd builds a command whose handler gets a connected client.
func userCmd(use, short string, args cobra.PositionalArgs, run func(ctx context.Context, c *client.Client, o *userConn, out io.Writer, args []string) error) *cobra.Command {
	o := &userConn{}
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  args,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, cancel, err := o.client(cmd.Context())
			if err != nil {
				return err
			}
			defer cancel()
			return run(ctx, c, o, cmd.OutOrStdout(), args)
		},
	}
	o.bind(cmd.Flags())
	return cmd
}

func newUserRunsCmd() *cobra.Command {
	runs := &cobra.Command{
		Use:   "runs",
		Short: "List, show, inspect and end your training runs",
	}
	runs.AddCommand(
		userCmd("list", "List your runs", cobra.NoArgs, func(ctx context.Context, c *client.Client, o *userConn, out io.Writer, _ []string) error {
			rs, err := c.ListRuns(ctx)
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, protocol.RunList{Runs: rs})
			}
			return printRunsTable(out, rs)
		}),
		userCmd("show RUN_ID", "Show a run: status, node, step, last metrics, checkpoints, spent", cobra.ExactArgs(1), func(ctx context.Context, c *client.Client, o *userConn, out io.Writer, args []string) error {
			r, err := c.GetRun(ctx, args[0])
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, r.Info())
			}
			return printRun(out, r.Info())
		}),
		userCmd("metrics RUN_ID", "Print a run's loss, grad norm and learning rate per step", cobra.ExactArgs(1), func(ctx context.Context, c *client.Client, o *userConn, out io.Writer, args []string) error {
			ms, err := c.RunMetrics(ctx, args[0])
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, protocol.MetricsResponse{Metrics: ms})
			}
			return printMetricsTable(out, ms)
		}),
		userCmd("delete RUN_ID", "End a run and free its node's session", cobra.ExactArgs(1), func(ctx context.Context, c *client.Client, o *userConn, out io.Writer, args []string) error {
			r, err := c.DeleteRun(ctx, args[0])
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, r)
			}
			_, err = fmt.Fprintf(out, "run %s %s at step %d, spent %s credits\n", r.ID, r.Status, r.Step, credits(r.Spent))
			return err
		}),
	)
	return runs
}

func newUserAccountCmd() *cobra.Command {
	return userCmd("account", "Show your balance, spending and recent charges", cobra.NoArgs, func(ctx context.Context, c *client.Client, o *userConn, out io.Writer, _ []string) error {
		a, err := c.Account(ctx)
		if err != nil {
			return err
		}
		if o.json {
			return printJSON(out, a)
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "account\t%s\nbalance\t%s credits\nspent\t%s credits\n", a.Account, credits(a.Balance), credits(a.Spent))
		if len(a.Charges) > 0 {
			fmt.Fprintf(tw, "\nTIME\tRUN\tCALL\tCREDITS\n")
			for _, ch := range a.Charges {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", ch.Time, dash(ch.RunID), ch.Call, credits(ch.Credits))
			}
		}
		return tw.Flush()
	})
}

func newUserModelsCmd() *cobra.Command {
	return userCmd("models", "List the base models the network serves, with prices", cobra.NoArgs, func(ctx context.Context, c *client.Client, o *userConn, out io.Writer, _ []string) error {
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
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\n", m.Name, m.ContextLength, bytesHuman(m.MemoryBytes),
				credits(m.Prices.TrainPer1K), credits(m.Prices.PrefillPer1K), credits(m.Prices.SamplePer1K), credits(m.Prices.StoragePerGBHour))
		}
		fmt.Fprintf(tw, "(prices in credits)\n")
		return tw.Flush()
	})
}

func newUserNodesCmd() *cobra.Command {
	return userCmd("nodes", "List the live nodes and their capacity", cobra.NoArgs, func(ctx context.Context, c *client.Client, o *userConn, out io.Writer, _ []string) error {
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
				dash(strings.Join(n.Models, ",")), n.Sessions, n.MaxSessions, n.LastSeen)
		}
		return tw.Flush()
	})
}

func printJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printRunsTable(out io.Writer, rs []protocol.Run) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "ID\tNAME\tMODEL\tSTATUS\tSTEP\tLOSS\tSPENT\tNODE\tCREATED\n")
	for _, r := range rs {
		loss := "-"
		if r.LastMetrics != nil && r.LastMetrics.LossMean != nil {
			loss = fmt.Sprintf("%.4f", *r.LastMetrics.LossMean)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", r.ID, dash(r.Name), r.BaseModel, r.Status, r.Step, loss,
			credits(r.Spent), dash(shortPeer(r.Node)), r.CreatedAt)
	}
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
	fmt.Fprintf(tw, "node\t%s\n", dash(r.Node))
	fmt.Fprintf(tw, "step\t%d\n", r.Step)
	if r.ResumedFromStep != nil {
		fmt.Fprintf(tw, "resumed from step\t%d\n", *r.ResumedFromStep)
	}
	fmt.Fprintf(tw, "checkpoint every\t%d steps\n", r.CheckpointEvery)
	fmt.Fprintf(tw, "spent\t%s credits\n", credits(r.Spent))
	fmt.Fprintf(tw, "created\t%s\n", r.CreatedAt)
	if m := r.LastMetrics; m != nil {
		fmt.Fprintf(tw, "last metrics\tstep %d, loss %s, grad norm %s, lr %s\n", m.Step, optFloat(m.LossMean), optFloat(m.GradNorm), optFloat(m.LearningRate))
	}
	for _, ck := range r.Checkpoints {
		var size int64
		for _, f := range ck.Files {
			size += f.Size
		}
		fmt.Fprintf(tw, "checkpoint\t%s step %d %s %s (%s, %d files)\n", ck.ID, ck.Step, ck.Mode, ck.URI, bytesHuman(size), len(ck.Files))
	}
	return tw.Flush()
}

func printMetricsTable(out io.Writer, ms []protocol.Metrics) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "STEP\tLOSS\tGRAD NORM\tLR\tTOKENS\tTIME\n")
	for _, m := range ms {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%s\n", m.Step, optFloat(m.LossMean), optFloat(m.GradNorm), optFloat(m.LearningRate), m.Tokens, m.Time)
	}
	return tw.Flush()
}

// credits formats micro-credits as credits, exactly (no float rounding).
func credits(mc protocol.MicroCredits) string {
	sign := ""
	if mc < 0 {
		sign, mc = "-", -mc
	}
	return fmt.Sprintf("%s%d.%06d", sign, mc/1_000_000, mc%1_000_000)
}

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
