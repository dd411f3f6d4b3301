// The incident socktrace exists for, as a pair of processes:
//
//	incident server -idle 1s
//	    An HTTP server on 127.0.0.1 that closes idle keep-alive
//	    connections after -idle (read, write and idle timeouts).
//	incident client -url URL -period 1s [-keepalive 30s] [-nofile N] [-requests N]
//	    A heartbeat that POSTs every -period and never closes the response
//	    body, so Go never returns the connection to its pool: one socket
//	    leaks per request. -keepalive is the dialer's TCP keep-alive (Go's
//	    default transport uses 30 s); -nofile lowers the soft fd limit (and
//	    raises the hard one, as root, to fit).
//
// Each step is reported as one JSON object per line on stdout, with the pid
// and the process's open fds, so a test can compare them with what socktrace
// says. Both run until stdin reaches EOF.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

var sayLock sync.Mutex

func say(fields map[string]interface{}) {
	fields["pid"] = os.Getpid()
	fields["ts"] = float64(time.Now().UnixNano()) / 1e9
	line, _ := json.Marshal(fields)
	sayLock.Lock()
	defer sayLock.Unlock()
	os.Stdout.Write(append(line, '\n'))
}

func openFds() int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	// ReadDir held one fd of its own while reading.
	return len(entries) - 1
}

// Ends the process when the test closes our stdin.
func exitOnEOF() {
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
}

func server(args []string) {
	flags := flag.NewFlagSet("server", flag.ExitOnError)
	idle := flags.Duration("idle", time.Second, "idle, read and write timeout")
	flags.Parse(args)
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	srv := &http.Server{
		ReadTimeout:  *idle,
		WriteTimeout: *idle,
		IdleTimeout:  *idle,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			w.Write([]byte("ok\n"))
		}),
	}
	say(map[string]interface{}{"port": listener.Addr().(*net.TCPAddr).Port})
	exitOnEOF()
	srv.Serve(listener)
}

func setNofile(soft uint64) {
	var limit syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &limit)
	limit.Cur = soft
	if limit.Max < soft {
		limit.Max = soft
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &limit); err != nil {
		fmt.Fprintln(os.Stderr, "setrlimit:", err)
		os.Exit(1)
	}
}

func client(args []string) {
	flags := flag.NewFlagSet("client", flag.ExitOnError)
	url := flags.String("url", "", "where to POST")
	period := flags.Duration("period", time.Second, "time between requests")
	keepalive := flags.Duration("keepalive", 30*time.Second, "TCP keep-alive of the dialer")
	nofile := flags.Uint64("nofile", 0, "soft RLIMIT_NOFILE (0: unchanged)")
	requests := flags.Int("requests", 1<<30, "requests to make at most")
	flags.Parse(args)
	if *nofile > 0 {
		setNofile(*nofile)
	}
	exitOnEOF()
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.DialContext = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: *keepalive}).DialContext
	httpClient := &http.Client{Transport: transport}
	say(map[string]interface{}{"started": true, "fds": openFds()})
	for i := 1; i <= *requests; i++ {
		resp, err := httpClient.Post(*url, "text/plain", strings.NewReader("heartbeat"))
		if err != nil {
			if errors.Is(err, syscall.EMFILE) {
				say(map[string]interface{}{"emfile": true, "requests": i - 1, "fds": openFds()})
				break
			}
			say(map[string]interface{}{"error": err.Error(), "requests": i - 1})
		} else {
			// The bug: resp.Body is never closed.
			_ = resp
			say(map[string]interface{}{"request": i, "fds": openFds()})
		}
		time.Sleep(*period)
	}
	say(map[string]interface{}{"done": true, "fds": openFds()})
	select {}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: incident server|client [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "server":
		server(os.Args[2:])
	case "client":
		client(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "usage: incident server|client [flags]")
		os.Exit(2)
	}
}
