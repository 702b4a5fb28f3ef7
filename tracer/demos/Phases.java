// The phases of a Java demo, and --pause: with it, each phase waits for
// Enter on stdin or SIGUSR1, so a tracer can look between phases.
// Shared by the Java demos (the C demos have demo_support.c).

import java.io.IOException;
import java.util.concurrent.Semaphore;
import java.util.function.Consumer;

final class Phases {
    private final Consumer<String> say;
    private final Semaphore resume = new Semaphore(0);
    private boolean pause = false;

    Phases(Consumer<String> say) {
        this.say = say;
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
