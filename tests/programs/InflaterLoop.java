// Makes zlib Inflaters for ever, in one method, hot enough for the JIT to
// compile it: the native memory of the live ones (inflateInit2_ in libz)
// has Java callers that only the JVM's perf map names. Each round ends the
// Inflaters of the round before, so memory stays bounded.
//
//   java -XX:+PreserveFramePointer InflaterLoop

import java.util.ArrayList;
import java.util.List;
import java.util.zip.Inflater;

public class InflaterLoop {
    static final List<Inflater> kept = new ArrayList<>();

    static void makeInflaters(int n) {
        for (int i = 0; i < n; i++) {
            kept.add(new Inflater());
        }
    }

    public static void main(String[] args) throws InterruptedException {
        System.out.println("ready");
        System.out.flush();
        while (true) {
            for (Inflater inflater : kept) {
                inflater.end();
            }
            kept.clear();
            makeInflaters(1000);
            Thread.sleep(20);
        }
    }
}
