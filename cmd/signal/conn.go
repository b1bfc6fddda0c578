package main

// The connection every API command shares, user's and admin's alike:
// where the coordinators are, the credential, the output format and a
// deadline. Flags win over a testnet file, which wins over the environment.

import (
	"context"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

// credential says which secret a command authenticates with.
type credential int

const (
	// apiKey: a user's API key (--api-key, the testnet's api_key, $SIGNAL_API_KEY).
	apiKey credential = iota
	// adminToken: the cluster's admin token (--admin-token, the testnet's
	// admin_token, $SIGNAL_ADMIN_TOKEN).
	adminToken
)

// conn holds the connection flags of one command.
type conn struct {
	cred                     credential
	url, testnet, key, token string
	json                     bool
	timeout                  time.Duration
	limit                    int
}

func (o *conn) bind(fs *pflag.FlagSet) {
	fs.StringVar(&o.url, "url", "", "coordinator URL; several, comma-separated, are tried in turn (default $SIGNAL_URL)")
	fs.StringVar(&o.testnet, "testnet", "", "read the coordinators and credentials from a testnet's testnet.json, or its directory (default $SIGNAL_TESTNET)")
	if o.cred == adminToken {
		fs.StringVar(&o.token, "admin-token", "", "admin token (default $SIGNAL_ADMIN_TOKEN; on the command line it shows in ps)")
		// The name these commands had before --url.
		fs.StringVar(&o.url, "coordinator", "", "coordinator URL")
		_ = fs.MarkDeprecated("coordinator", "use --url")
	} else {
		fs.StringVar(&o.key, "api-key", "", "API key (default $SIGNAL_API_KEY)")
	}
	fs.BoolVar(&o.json, "json", false, "print the API's JSON instead of a table")
	fs.DurationVar(&o.timeout, "timeout", time.Minute, "give up after this long")
}

// bindLimit adds --limit to a listing command.
func (o *conn) bindLimit(fs *pflag.FlagSet, what string) {
	fs.IntVar(&o.limit, "limit", 20, "show at most this many "+what+", newest first (0: all)")
}

// resolve finds the coordinators and the credential.
func (o *conn) resolve() (urls []string, secret string, err error) {
	tnPath := o.testnet
	if tnPath == "" {
		tnPath = os.Getenv("SIGNAL_TESTNET")
	}
	var tf *client.TestnetFile
	if tnPath != "" {
		if tf, err = client.ReadTestnetFile(tnPath); err != nil {
			return nil, "", usageErr(err)
		}
	}
	switch {
	case o.url != "":
		urls = splitURLs(o.url)
	case tf != nil:
		urls = tf.Coordinators
	default:
		urls = splitURLs(os.Getenv("SIGNAL_URL"))
	}
	if len(urls) == 0 {
		return nil, "", usageErrorf("no coordinator URL: pass --url or --testnet, or set SIGNAL_URL or SIGNAL_TESTNET")
	}
	if o.cred == adminToken {
		secret = firstSet(o.token, testnetField(tf, func(t *client.TestnetFile) string { return t.AdminToken }), os.Getenv("SIGNAL_ADMIN_TOKEN"))
		if secret == "" {
			return nil, "", usageErrorf("no admin token: set SIGNAL_ADMIN_TOKEN, or pass --testnet or --admin-token")
		}
	} else {
		secret = firstSet(o.key, testnetField(tf, func(t *client.TestnetFile) string { return t.APIKey }), os.Getenv("SIGNAL_API_KEY"))
		if secret == "" {
			return nil, "", usageErrorf("no API key: set SIGNAL_API_KEY, or pass --api-key or --testnet")
		}
	}
	if o.timeout <= 0 {
		return nil, "", usageErrorf("--timeout %v: want > 0", o.timeout)
	}
	if o.limit < 0 {
		return nil, "", usageErrorf("--limit %d: want ≥ 0 (0: all)", o.limit)
	}
	return urls, secret, nil
}

// client connects. For admin commands the client carries no API key: each
// admin call takes the token (the secret returned) explicitly.
func (o *conn) client(ctx context.Context) (*client.Client, string, context.Context, context.CancelFunc, error) {
	urls, secret, err := o.resolve()
	if err != nil {
		return nil, "", nil, nil, err
	}
	key := secret
	if o.cred == adminToken {
		key = ""
	}
	c, err := client.NewCluster(urls, key)
	if err != nil {
		return nil, "", nil, nil, usageErr(err)
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	return c, secret, ctx, cancel, nil
}

func splitURLs(s string) []string {
	var out []string
	for _, u := range strings.Split(s, ",") {
		if u = strings.TrimSpace(u); u != "" {
			out = append(out, u)
		}
	}
	return out
}

func firstSet(vs ...string) string {
	for _, v := range vs {
		if v != "" {
			return v
		}
	}
	return ""
}

func testnetField(tf *client.TestnetFile, f func(*client.TestnetFile) string) string {
	if tf == nil {
		return ""
	}
	return f(tf)
}

// apiRun is a command's body: a connected client, the admin token (admin
// commands), the connection flags, where to write, and the arguments.
type apiRun func(ctx context.Context, c *client.Client, token string, o *conn, out io.Writer, args []string) error

// apiCmd builds a command that connects as cred before running.
func apiCmd(use, short string, cred credential, args cobra.PositionalArgs, run apiRun) (*cobra.Command, *conn) {
	o := &conn{cred: cred}
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  args,
		RunE: func(cmd *cobra.Command, args []string) error {
			if cred == adminToken {
				warnSecretFlags(cmd, map[string]string{"admin-token": "SIGNAL_ADMIN_TOKEN"})
			}
			c, token, ctx, cancel, err := o.client(cmd.Context())
			if err != nil {
				return err
			}
			defer cancel()
			return run(ctx, c, token, o, cmd.OutOrStdout(), args)
		},
	}
	o.bind(cmd.Flags())
	return cmd, o
}

// userCmd builds a command of the user's, authenticated with an API key.
func userCmd(use, short string, args cobra.PositionalArgs, run func(ctx context.Context, c *client.Client, o *conn, out io.Writer, args []string) error) *cobra.Command {
	cmd, _ := apiCmd(use, short, apiKey, args, func(ctx context.Context, c *client.Client, _ string, o *conn, out io.Writer, args []string) error {
		return run(ctx, c, o, out, args)
	})
	return cmd
}

// listCmd is a userCmd that lists: it has --limit, naming what it lists.
func listCmd(use, short, what string, args cobra.PositionalArgs, run func(ctx context.Context, c *client.Client, o *conn, out io.Writer, args []string) error) *cobra.Command {
	cmd, o := apiCmd(use, short, apiKey, args, func(ctx context.Context, c *client.Client, _ string, o *conn, out io.Writer, args []string) error {
		return run(ctx, c, o, out, args)
	})
	o.bindLimit(cmd.Flags(), what)
	return cmd
}

// adminCmd builds an admin command, authenticated with the admin token.
func adminCmd(use, short string, args cobra.PositionalArgs, run apiRun) (*cobra.Command, *conn) {
	return apiCmd(use, short, adminToken, args, run)
}

// creditsFlag is a --credits value: a decimal number of credits, read
// exactly into micro-credits.
type creditsFlag struct {
	mc  int64
	set bool
}

func (f *creditsFlag) String() string {
	if !f.set {
		return "0"
	}
	return trimCredits(f.mc)
}

// trimCredits writes micro-credits as credits without trailing zeros
// ("1000", "0.5").
func trimCredits(mc int64) string {
	s := strings.TrimRight(protocol.FormatCredits(mc), "0")
	return strings.TrimSuffix(s, ".")
}

func (f *creditsFlag) Set(s string) error {
	mc, err := protocol.ParseCredits(s)
	if err != nil {
		return err
	}
	f.mc, f.set = mc, true
	return nil
}

func (f *creditsFlag) Type() string { return "number" }
