// What the Java demos share (the C demos have demo_support.c): numeric
// options, their phases, and --pause: with it, each phase waits for Enter
// on stdin or SIGUSR1, so a tracer can look between phases.

import java.io.IOException;
import java.util.concurrent.Semaphore;
import java.util.function.Consumer;

final class DemoSupport {
    private final Consumer<String> say;
    private final Semaphore resume = new Semaphore(0);
    private boolean pause = false;

    DemoSupport(Consumer<String> say) {
        this.say = say;
    }

    // The number after an option, within [min, max]; else a message and exit 2.
    static double number(String[] args, int i, double min, double max, Consumer<String> say) {
        if (i >= args.length) {
            say.accept(args[i - 1] + " needs a value (see --help)");
            System.exit(2);
        }
        try {
            double value = Double.parseDouble(args[i]);
            if (value >= min && value <= max) {
                return value;
            }
        } catch (NumberFormatException e) {
            // reported below
        }
        say.accept(args[i - 1] + ": '" + args[i] + "' is not a number from " + min + " to " + max);
        System.exit(2);
        return 0;
    }

    // Called once, when --pause was given.
    void pauseBetweenPhases() {
        pause = true;
        sun.misc.Signal.handle(new sun.misc.Signal("USR1"), s -> resume.release());
        Thread reader = new Thread(() -> {
            try {
                int c;
                while ((c = System.in.read()) >= 0) {
                    if (c == '\n') {
                        resume.release();
                    }
                }
            } catch (IOException e) {
                // stdin gone: SIGUSR1 still works
            }
        }, "stdin-reader");
        reader.setDaemon(true);
        reader.start();
    }

    void phase(String name, String what) throws InterruptedException {
        if (pause) {
            resume.drainPermits();
            say.accept("paused before phase " + name + ": press Enter or run 'kill -USR1 "
                + ProcessHandle.current().pid() + "'");
            resume.acquire();
        }
        say.accept("phase " + name + ": " + what);
    }
}
